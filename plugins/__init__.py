"""kdcli's built-in methods, registered through the ``kdcli.methods`` entry points like any plugin."""
