"""Features by module name: forward hooks, so any ``nn.Module`` serves; a missing name is one line listing the names."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from kdcli.errors import UsageError
from kdcli.features import tap_modules
from kdcli.method import Batch, FrozenTeacher, Method, MethodContext, StepOutput, module_features
from kdcli.models import create_model
from kdcli.registry import load_model_plugins
from kdcli.task import TrainableModule

INPUT_SIZE = (3, 16, 16)


def resnet8() -> nn.Module:
    load_model_plugins()
    return create_model("cifar_resnet8", num_classes=10, input_size=INPUT_SIZE)


def test_a_named_module_gives_the_same_feature_as_its_stage_index() -> None:
    model = resnet8().eval()
    inputs = torch.randn(2, *INPUT_SIZE)
    with torch.no_grad():
        logits, (second, third) = module_features(model, inputs, ["layer2", "layer3"])
        stages = model.forward_intermediates(inputs, intermediates_only=True)
        torch.testing.assert_close(logits, model(inputs))
    assert torch.equal(second, stages[2]) and torch.equal(third, stages[3])
    module_features(model, inputs, ["layer2"])
    assert len(model.layer2._forward_hooks) == 1  # registered once per module and name


def test_a_model_without_forward_intermediates_serves_by_name() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    inputs = torch.randn(5, 4)
    logits, (hidden,) = module_features(model, inputs, ["1"])
    torch.testing.assert_close(hidden, torch.relu(model[0](inputs)))
    assert logits.shape == (5, 3)


def test_a_missing_name_is_one_line_with_the_available_names() -> None:
    with pytest.raises(UsageError) as raised:
        module_features(resnet8(), torch.randn(2, *INPUT_SIZE), ["layer4"])
    message = str(raised.value)
    assert "\n" not in message and raised.value.exit_code == 2
    assert "has no module named 'layer4'" in message and "did you mean" in message
    assert "layer1, layer1.0" in message and "fc" in message


class NamedHint(Method):
    """A hint from the student's ``layer2`` to the teacher's: the helpers a method uses."""

    def training_step(self, batch: Batch) -> StepOutput:
        logits, (feature,) = self.student_logits_and_module_features(batch.inputs, ["layer2"])
        _, (hint,) = self.teacher_module_features(batch.inputs, ["layer2"])
        return StepOutput(logits, {"hint": nn.functional.mse_loss(feature, hint)})


def test_a_method_reads_both_networks_by_name_through_the_compiled_trainable_module() -> None:
    context = MethodContext(num_classes=10, num_train=4, epochs=1, steps_per_epoch=1, device=torch.device("cpu"), mean=(0.0,) * 3, std=(1.0,) * 3)
    method = NamedHint(Method.Params(), student=resnet8(), teacher=FrozenTeacher(resnet8()), context=context)
    task = TrainableModule(method)
    torch._dynamo.reset()
    counters.clear()
    try:
        method.use_student_forward(torch.compile(task, backend="eager"))
        batch = Batch(torch.randn(4, *INPUT_SIZE), torch.zeros(4, dtype=torch.int64), torch.arange(4))
        for _ in range(2):
            task.zero_grad()
            method.training_step(batch).losses["hint"].backward()
    finally:
        torch._dynamo.reset()
    assert all(parameter.grad is not None for parameter in task.student.layer2.parameters())
    assert all(parameter.grad is None for parameter in task.student.layer3.parameters())  # after layer2: no gradient
    assert not counters["graph_break"], dict(counters["graph_break"])  # dynamo traces the hooks into the graph


def test_taps_forget_what_a_plain_forward_left() -> None:
    # Validation runs the plain student, whose hooks still fire: a compiled forward that guarded on the taps
    # being None would recompile in every epoch after the first (pkt and rkd under train.compile did).
    model = resnet8()
    taps = tap_modules(model, ["layer2"])
    model(torch.randn(2, *INPUT_SIZE))
    assert taps["layer2"] is not None
    assert tap_modules(model, ["layer2"])["layer2"] is None
