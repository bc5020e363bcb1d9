"""Core behaviour of ``nbt.shapecheck``: what is recorded, and that the user's world is untouched."""

from __future__ import annotations

import gc
import inspect
import json
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals
from torch.overrides import TorchFunctionMode

import nbtrouble as nbt
from nbtrouble import _location


def line_of(func, text: str) -> str:
    """``"file:line"`` of the line of ``func``'s source containing ``text``."""
    lines, start = inspect.getsourcelines(func)
    matches = [start + i for i, line in enumerate(lines) if text in line]
    assert len(matches) == 1
    return f"{inspect.getsourcefile(func)}:{matches[0]}"


class Net(nn.Module):
    def __init__(self, hidden: int = 16, fc2_in: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(fc2_in, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.fc1(x)))
        return self.fc2(h)


def global_state() -> dict[str, object]:
    return {
        "function_modes": torch._C._len_torch_function_stack(),
        "pre_hooks": len(module_globals._global_forward_pre_hooks),
        "hooks": len(module_globals._global_forward_hooks),
        "always_called": len(module_globals._global_forward_hooks_always_called),
        "grad": torch.is_grad_enabled(),
        "default_device": str(torch.get_default_device()),
        "stance": torch._dynamo.eval_frame._stance.stance,
        "warning_filters": list(warnings.filters),
    }


# --- what is recorded -----------------------------------------------------------------------


def test_ops_carry_module_path_shapes_and_user_line() -> None:
    model, x = Net(), torch.randn(4, 8)
    with nbt.shapecheck() as trace:
        model(x)
    linear = [op for op in trace.ops if op.name == "torch.nn.functional.linear"]
    assert [op.module for op in linear] == ["fc1", "fc2"]
    assert linear[0].input_shapes == ((4, 8), (16, 8), (16,))
    assert linear[0].output_shapes == ((4, 16),)
    assert linear[0].dtypes == ("float32",) * 3 and linear[0].devices == ("cpu",) * 3
    assert linear[0].location == line_of(Net.forward, "self.fc1(x)")
    assert linear[0].source_line == "h = torch.relu(self.norm(self.fc1(x)))"
    relu = next(op for op in trace.ops if op.name == "torch.relu")
    assert relu.module == ""
    assert [(m.path, m.type_name) for m in trace.modules] == [
        ("fc1", "Linear"), ("norm", "BatchNorm1d"), ("fc2", "Linear"), ("", "Net"),
    ]  # fmt: skip
    assert trace.modules[-1].output_shapes == ((4, 3),)


def test_metadata_reads_and_module_construction_are_not_ops() -> None:
    with nbt.shapecheck() as trace:
        model = nn.Linear(8, 4)  # built in the block: its initialisation is not an op
        y = model(torch.randn(2, 8))
        _ = y.shape, y.dim(), y.size(0), y.is_contiguous(), y.grad_fn
        _ = y.T  # a shape-changing property is an op
    names = [op.name for op in trace.ops]
    assert names == ["torch.randn", "torch.nn.functional.linear", "torch.Tensor.T.__get__"]


def test_location_helpers() -> None:
    assert _location.is_internal_file(torch.__file__)
    assert _location.is_internal_file(nbt.__file__)
    assert _location.is_internal_file(inspect.__file__)
    assert not _location.is_internal_file(__file__) and _location.is_user_file(__file__)
    assert _location.is_user_file("<ipython-input-3-abc>")
    assert not _location.is_user_file("/x/lib/python3.11/site-packages/transformers/models/a.py")
    location, source, frame = _location.user_location(sys._getframe())
    assert location == f"{__file__}:{sys._getframe().f_lineno - 1}" and frame is not None
    assert source.startswith("location, source, frame")


def test_error_raised_by_module_code_names_the_module_and_line() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(10, 20)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    model = Tagger()
    with pytest.raises(RuntimeError) as excinfo, nbt.shapecheck() as trace:
        model(torch.randn(5, 3, 8))
    failure = trace.failure
    assert failure.error is excinfo.value
    assert failure.module == "rnn" and failure.name == "torch.nn.modules.rnn.LSTM"
    assert failure.location == line_of(Tagger.forward, "self.rnn(x)")
    assert failure.input_shapes == ((5, 3, 8),)
    assert failure.operands["input"].shape == (5, 3, 8)
    assert "input_size=10" in failure.finding.message


def test_exception_propagates_unchanged_with_a_note() -> None:
    model = Net(fc2_in=5)
    expected = "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(RuntimeError, match=expected) as excinfo, nbt.shapecheck() as trace:
        model(torch.randn(4, 8))
    assert trace.failure.error is excinfo.value
    assert excinfo.value.args == ("mat1 and mat2 shapes cannot be multiplied (4x16 and 5x3)",)
    assert excinfo.value.__notes__ == [
        f"shapecheck: {trace.failure.finding.message}\n  hint: {trace.failure.finding.hint}"
    ]
    assert set(trace.failure.operands) == {"input", "weight", "bias"}


def test_error_caught_inside_the_block_is_no_failure() -> None:
    model = Net(fc2_in=5)
    with nbt.shapecheck() as trace:
        try:
            model(torch.randn(4, 8))
        except RuntimeError:
            pass
    assert trace.failure is None


def test_capture_exception_after_the_block() -> None:
    """The magic's ``run_cell`` swallows the error; it hands it over afterwards."""
    model = Net(fc2_in=5)
    with nbt.shapecheck() as trace:
        try:
            model(torch.randn(4, 8))
        except RuntimeError as e:
            swallowed = e
    trace.capture_exception(swallowed)
    assert trace.failure.error is swallowed and trace.failure.module == "fc2"


def test_user_error_without_tensor_op_sets_no_failure() -> None:
    with pytest.raises(KeyError), nbt.shapecheck() as trace:
        {}["missing"]
    assert trace.failure is None


# --- leaving the user's world as it was ----------------------------------------------------------


class Interrupting(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


@pytest.mark.parametrize("meta", [False, True])
@pytest.mark.parametrize("ending", ["normal", "error", "interrupt", "interrupt_in_forward"])
def test_global_state_is_restored(meta: bool, ending: str) -> None:
    before = global_state()
    model = Net(fc2_in=5 if ending == "error" else 16)
    expected = {"normal": None, "error": RuntimeError}.get(ending, KeyboardInterrupt)
    try:
        with nbt.shapecheck(meta=meta):
            torch.set_grad_enabled(False)
            model(torch.randn(4, 8))
            if ending == "interrupt":
                raise KeyboardInterrupt
            if ending == "interrupt_in_forward":
                Interrupting()(torch.randn(2))
    except (RuntimeError, KeyboardInterrupt) as e:
        assert type(e) is expected
    else:
        assert expected is None
    assert global_state() == before


def test_user_function_modes_and_hooks_keep_working() -> None:
    class Counting(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(getattr(func, "__name__", "?"))
            return func(*args, **(kwargs or {}))

    model, x = Net(), torch.randn(4, 8)
    calls: list[str] = []
    handle = model.fc1.register_forward_hook(lambda m, i, o: calls.append("fc1"))
    global_handle = module_globals.register_module_forward_pre_hook(
        lambda m, i: calls.append(type(m).__name__)
    )
    try:
        outer, inner = Counting(), Counting()
        with outer, nbt.shapecheck() as trace, inner:
            model(x)
    finally:
        handle.remove()
        global_handle.remove()
    assert "linear" in outer.seen and "linear" in inner.seen
    fc1_line = line_of(Net.forward, "self.fc1(x)")
    assert next(op for op in trace.ops if op.module == "fc1").location == fc1_line
    assert calls == ["Net", "Linear", "fc1", "BatchNorm1d", "Linear"]
    assert [op.module for op in trace.ops if op.name.endswith("linear")] == ["fc1", "fc2"]


def test_a_loop_folds_into_counts() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with nbt.shapecheck() as trace:
        for _ in range(10_000):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
    assert len(trace.ops) <= 5
    assert {op.count for op in trace.ops} == {10_000}
    assert trace.folded == sum(op.count - 1 for op in trace.ops)
    assert trace.modules[0].count == 10_000 and trace.dropped == 0


def test_distinct_ops_beyond_the_cap_are_counted_as_dropped() -> None:
    x = torch.zeros(30)
    with nbt.shapecheck(max_ops=10) as trace:
        for n in range(1, 31):
            x[:n] + 1  # one slicing record (folded), then 30 adds of distinct shapes
    assert len(trace.ops) == 10
    assert trace.folded == 29 and trace.dropped == 21


def test_no_tensor_is_kept_alive() -> None:
    refs: list[weakref.ref[torch.Tensor]] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = x * 2
            refs.append(weakref.ref(hidden))
            return hidden.sum()

    with nbt.shapecheck() as trace:
        out = Spy()(torch.randn(16, 16))
    del out
    gc.collect()
    assert refs[0]() is None
    assert trace.ops


def test_failure_keeps_only_the_failing_operands() -> None:
    model = Net(fc2_in=5)
    with pytest.raises(RuntimeError), nbt.shapecheck() as trace:
        model(torch.randn(4, 8))
    assert trace.failure.operands["weight"] is model.fc2.weight


@pytest.mark.parametrize("bad", [{"meta": 1}, {"max_ops": 0}, {"max_ops": "5"}])
def test_bad_arguments(bad: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        nbt.shapecheck(**bad)


# --- compiled models, autocast --------------------------------------------------------------


def test_compiled_model_is_traced_through_its_original_module() -> None:
    model = Net(fc2_in=5)
    compiled = torch.compile(model)
    assert compiled._orig_mod is model
    before = global_state()
    with pytest.raises(RuntimeError), nbt.shapecheck() as trace:
        compiled(torch.randn(4, 8))
    assert global_state() == before
    assert trace.failure.module == "fc2"
    assert trace.failure.location == line_of(Net.forward, "return self.fc2(h)")
    assert [m.path for m in trace.modules] == ["fc1", "norm", "fc2", ""]


def test_autocast_bfloat16_on_cpu() -> None:
    model, x = Net(), torch.randn(4, 8)
    with nbt.shapecheck() as trace, torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert trace.failure is None
    assert [op.module for op in trace.ops if op.name.endswith("linear")] == ["fc1", "fc2"]
    assert trace.findings == []


# --- meta mode ------------------------------------------------------------------------------


def test_meta_model_built_in_the_block_allocates_nothing() -> None:
    with nbt.shapecheck(meta=True) as trace:
        model = nn.Sequential(nn.Linear(50_000, 50_000), nn.ReLU(), nn.Linear(50_000, 3))
        y = model(torch.randn(2, 50_000))
    assert model[0].weight.device.type == "meta" and y.device.type == "meta"
    assert y.shape == (2, 3) and trace.meta
    assert [op.module for op in trace.ops if op.name.endswith("linear")] == ["0", "2"]
    assert torch.get_default_device().type == "cpu"


def test_meta_leaves_an_existing_model_untouched() -> None:
    model = Net()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    with nbt.shapecheck(meta=True) as trace:
        y = model(x)
        y.sum().backward()
    assert y.device.type == "meta" and y.shape == (4, 3)
    for name, value in model.state_dict().items():
        assert value.device.type == "cpu"
        assert value.dtype == before[name].dtype
        assert torch.equal(value, before[name]), name  # running stats included
    assert all(p.grad is None for p in model.parameters())
    assert model.training and trace.failure is None


_SEVEN_B = """
import json, resource, sys, time
import torch
import nbtrouble as nbt
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(1)
config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     intermediate_size=11008, vocab_size=32000)
start = time.perf_counter()
with nbt.shapecheck(meta=True) as trace:
    model = LlamaForCausalLM(config)
    logits = model(input_ids=torch.randint(0, 32000, (1, 256))).logits
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "params": sum(p.numel() for p in model.parameters()),
    "logits": list(logits.shape),
    "linear_modules": sorted({op.module for op in trace.ops if op.name.endswith("linear")})[:2],
    "failure": trace.failure is not None,
}))
"""


def test_meta_7b_decoder_config_is_fast_and_small() -> None:
    pytest.importorskip("transformers")
    done = subprocess.run(
        [sys.executable, "-c", _SEVEN_B], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["params"] > 6.5e9 and result["logits"] == [1, 256, 32000]
    assert not result["failure"]
    assert result["linear_modules"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    assert result["seconds"] < 10
    assert result["peak_gib"] < 1


def test_meta_value_dependent_code_is_named() -> None:
    model = Net()
    with pytest.raises(RuntimeError) as excinfo, nbt.shapecheck(meta=True) as trace:
        loss = model(torch.randn(4, 8)).sum()
        loss.item()
    assert trace.failure.error is excinfo.value
    assert trace.failure.name == "torch.Tensor.item"
    assert "meta=True does not compute" in trace.failure.finding.message
    assert trace.failure.location == line_of(
        test_meta_value_dependent_code_is_named, "loss.item()\n"
    )


def test_part_called_alone_then_whole_model_gets_its_full_path() -> None:
    model, x = Net(), torch.randn(4, 8)
    with nbt.shapecheck() as trace:
        model.fc1(x)  # a root of its own: path ""
        model(x)
    linear = [op.module for op in trace.ops if op.name.endswith("linear")]
    assert linear == ["", "fc1", "fc2"]


# --- nested tensors, sums that overflow, the debugger, analyzers' interest ---------------------


def test_transformer_encoder_with_padding_mask_in_eval_mode() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(3, 5, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad(), nbt.shapecheck() as trace:
        y = encoder(x, src_key_padding_mask=padding)
    assert y.shape == (3, 5, 16) and trace.failure is None and trace.findings == []
    assert [m.path for m in trace.modules][-1] == ""


def test_nested_tensor_shapes_are_ragged() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype: torch says so
        nested = torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(4, 16)])
    layer = nn.Linear(16, 4)
    with torch.no_grad(), nbt.shapecheck() as trace:
        y = layer(nested * 2)
    assert y.is_nested and trace.failure is None and trace.findings == []
    mul, linear = trace.ops
    assert mul.input_shapes == ((2, -1, 16),) and mul.output_shapes == ((2, -1, 16),)
    assert linear.input_shapes == ((2, -1, 16), (4, 16), (4,))
    assert trace.modules[0].input_shapes == ((2, -1, 16),)
    assert trace.modules[0].output_shapes == ((2, -1, 4),)

    too_narrow = nn.Linear(8, 4)
    with pytest.raises(RuntimeError, match="Shape mismatch for NestedTensor") as excinfo:
        with nbt.shapecheck() as trace:
            too_narrow(nested)
    assert trace.failure.error is excinfo.value
    assert trace.failure.input_shapes == ((2, -1, 16), (4, 8), (4,))
    assert "(2, -1, 16)" in trace.failure.finding.message


def test_finite_mask_whose_sum_overflows_is_no_alarm() -> None:
    """A mask of ``finfo.min`` (as transformers builds them) sums to -inf, yet is finite."""
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[-1, 4:] = False
    lowest = torch.finfo(torch.float32).min
    scores = torch.randn(8, 8)
    with nbt.shapecheck() as trace:
        mask = torch.where(keep, torch.zeros(()), lowest)
        mask[keep.logical_not() & keep] = 0.0  # writes nothing; its sum overflows all the same
        gates = (scores + mask).sigmoid()  # sigmoid attention: masked scores gate to 0
        F.mse_loss(gates, torch.zeros(8, 8))
    assert torch.isfinite(gates).all() and gates[-1, 4:].eq(0).all()
    assert trace.findings == []


def test_plus_and_minus_inf_are_an_inf_not_a_nan() -> None:
    signs = torch.tensor([1.0, -1.0, 1.0])
    with nbt.shapecheck() as trace:
        blown = signs / 0.0  # sums to NaN, holds no NaN
        F.mse_loss(blown, torch.zeros(3))
    (finding,) = trace.findings
    assert finding.kind == "nonfinite"
    assert finding.message.startswith("Inf reached the loss mse_loss")
    assert finding.where == line_of(
        test_plus_and_minus_inf_are_an_inf_not_a_nan, "blown " + "= signs"
    )


def test_debug_opens_the_debugger_on_the_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbtrouble import _debugger

    opened: list[object] = []
    monkeypatch.setattr(_debugger, "post_mortem", opened.append)
    with pytest.raises(RuntimeError), nbt.shapecheck() as trace:
        Net(fc2_in=5)(torch.randn(4, 8))
    trace.debug()
    assert opened == [trace]


def test_debug_without_failure_says_so() -> None:
    with nbt.shapecheck() as trace:
        Net()(torch.randn(4, 8))
    with pytest.raises(ValueError, match="no failure"):
        trace.debug()


def test_analyzer_without_declared_interest_sees_every_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbtrouble import shapes

    class Spy:
        def __init__(self) -> None:
            self.names: list[str] = []

        def on_op(self, event) -> None:
            self.names.append(event.name)

        def findings(self) -> list[nbt.Finding]:
            return []

    spy = Spy()
    monkeypatch.setattr(shapes, "default_analyzers", lambda: [spy])
    with nbt.shapecheck() as trace:
        Net()(torch.randn(4, 8)).reshape(-1).view(4, 3)
    assert spy.names == [op.name for op in trace.ops]
    assert "torch.Tensor.view" in spy.names
