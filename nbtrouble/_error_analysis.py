"""Per-example errors of a model over a data loader, and the lecture's error-analysis table.

Both ``biasvar``'s model form (the mean of the per-example errors of each split) and
``error_analysis`` (the same errors grouped by slice) stand on :func:`measure`.

What a loader may yield
-----------------------
- ``(inputs, targets)``: the model is called as ``model(inputs)``; a longer tuple
  ``(a, b, ..., targets)`` calls ``model(a, b, ...)``: the last element is always the target.
- a dict with a ``"labels"`` (or ``"label"``) key: the model is called as ``model(**rest)``
  with the other keys (a slice column named by ``slices="key"`` is left out too).

Tensors are moved to the device of the model's first parameter. A model output with a
``logits`` attribute or key (Hugging Face) is read through it; a tuple output through its
first element.
"""

from __future__ import annotations

import inspect
import math
import numbers
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nbtrouble.findings import NbTroubleError

BUILTIN_METRICS = ("error", "mse", "mae")
LABEL_KEYS = ("labels", "label")
IGNORE_INDEX = -100  # the default of torch's cross-entropy and Hugging Face's padding label


class BadInput(NbTroubleError, ValueError):
    """A value the user passed cannot be used; ``argument`` names the parameter."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.detail = message


class BadInputType(NbTroubleError, TypeError):
    """An object of the wrong kind; ``argument`` names the parameter."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.detail = message


def is_number(value: Any) -> bool:
    """True for a real number, including numpy scalars and 0-d tensors (not ``bool``)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 0
    return isinstance(value, numbers.Number)


def as_error(value: Any, name: str) -> float:
    """``value`` as a finite, non-negative error; else an error that names ``name``."""
    if not is_number(value) or isinstance(value, complex):
        raise BadInputType(name, f"expected a number, got {type(value).__name__} {value!r:.40}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise BadInput(name, f"must be a finite error, got {number}")
    if number < 0:
        raise BadInput(name, f"an error cannot be negative, got {number}")
    return number


# ---------------------------------------------------------------------------------------
# Measuring errors
# ---------------------------------------------------------------------------------------


@dataclass
class Measured:
    """The errors of one split: their mean over all samples, and per example when known."""

    mean: float
    count: int
    per_example: np.ndarray | None = None
    slices: list[Any] | None = None


def check_metric(metric: Any) -> None:
    """Raise unless ``metric`` is a built-in name or a callable."""
    if callable(metric):
        return
    if not isinstance(metric, str):
        raise BadInputType(
            "metric",
            f"expected one of {BUILTIN_METRICS} or a callable, got {type(metric).__name__}",
        )
    if metric not in BUILTIN_METRICS:
        raise BadInput(
            "metric", f"unknown metric {metric!r}; use one of {BUILTIN_METRICS} or a callable"
        )


def check_model(model: Any) -> None:
    """Raise unless ``model`` can be called on a batch."""
    if not callable(model):
        raise BadInputType(
            "model",
            f"expected a torch.nn.Module or a callable, got {type(model).__name__} {model!r:.40}; "
            "for errors you already measured, pass them as keywords: biasvar(train=0.2, val=0.27)",
        )


def check_loader(loader: Any, argument: str) -> None:
    """Raise unless ``loader`` can be iterated over for batches."""
    if isinstance(loader, (str, bytes, Mapping)) or not isinstance(loader, Iterable):
        raise BadInputType(
            argument,
            f"expected a data loader (an iterable of batches), got {type(loader).__name__}",
        )


def measure(
    model: Callable[..., Any],
    loader: Iterable[Any],
    metric: str | Callable[..., Any],
    *,
    argument: str,
    progress: bool = True,
    slices: Callable[[Any], Sequence[Any]] | str | None = None,
) -> Measured:
    """Evaluate ``model`` over ``loader`` in eval mode under ``torch.no_grad()``.

    The mean is taken over all samples, not over batches, so a short last batch counts for
    what it holds. Every module's ``training`` flag and the random number generators are as
    before when this returns or raises (iterating a shuffling ``DataLoader`` draws from
    torch's generator).

    Parameters
    ----------
    model, loader, metric
        See :func:`nbtrouble.biasvar`.
    argument
        The parameter name that error messages and the progress bar use.
    progress
        Show a progress bar over the loader.
    slices
        When given, also collect each example's slice label: a function of the batch that
        returns one label per example, or the key of a dict batch that holds them.

    Examples
    --------
    >>> measure(model, val_loader, "error", argument="val").mean  # doctest: +SKIP
    0.27
    """
    check_loader(loader, argument)
    tally = _Tally(metric, argument, keep_examples=slices is not None)
    labels: list[Any] = []
    place = _Placement.of(model)
    inputs_taken = _positional_capacity(model)
    with (
        _preserved_state(model),
        torch.no_grad(),
        _progress_bar(loader, argument, progress) as batches,
    ):
        for number, batch in enumerate(batches):
            args, kwargs, targets = _split_batch(
                batch, argument, _excluded_key(slices), inputs_taken
            )
            outputs = _call(model, place.inputs(args), place.inputs(kwargs), argument, number)
            size = tally.add(outputs, place.targets(targets))
            if slices is not None:
                labels.extend(_slice_labels(slices, batch, size, argument))
    if tally.count == 0:
        raise BadInput(argument, _nothing_yielded(loader))
    return Measured(
        tally.mean, tally.count, tally.per_example(), labels if slices is not None else None
    )


class _Tally:
    """Adds up per-example errors batch by batch."""

    def __init__(
        self, metric: str | Callable[..., Any], argument: str, keep_examples: bool
    ) -> None:
        self.metric = metric
        self.argument = argument
        self.total = 0.0
        self.count = 0
        self.examples: list[np.ndarray] | None = [] if keep_examples else None
        # A single output per example is read as probabilities or as logits; decided once,
        # on the first batch, so that every batch of a split is read the same way.
        self.probabilities: bool | None = None

    @property
    def mean(self) -> float:
        return self.total / self.count

    def per_example(self) -> np.ndarray | None:
        if self.examples is None:
            return None
        return np.concatenate(self.examples) if self.examples else np.zeros(0)

    def add(self, outputs: Any, targets: Any) -> int:
        """Count one batch; returns its number of examples."""
        if callable(self.metric):
            errors, size, batch_mean = self._user_metric(outputs, targets)
        else:
            errors = self._builtin(
                _as_tensor(outputs, "model output"), _as_tensor(targets, "targets")
            )
            size, batch_mean = len(errors), None
        if errors is not None:
            values = errors.detach().double().cpu().numpy()
            self._check_finite(values)
            self.total += float(values.sum())
            if self.examples is not None:
                self.examples.append(values)
        else:
            self._check_finite(np.array([batch_mean]))
            self.total += batch_mean * size
        self.count += size
        return size

    def _check_finite(self, values: np.ndarray) -> None:
        if not np.all(np.isfinite(values)):
            raise BadInput(
                self.argument,
                f"the metric gave a non-finite error on batch after {self.count} examples "
                "(NaN or Inf in the model's outputs or the targets?)",
            )

    def _user_metric(
        self, outputs: Any, targets: Any
    ) -> tuple[torch.Tensor | None, int, float | None]:
        size = _batch_size(targets, self.argument)
        result = self.metric(outputs, targets)  # type: ignore[operator]
        values = torch.as_tensor(
            np.asarray(result.detach().cpu() if isinstance(result, torch.Tensor) else result)
        )
        if values.dim() == 0:
            if self.examples is not None:
                raise BadInput(
                    "metric",
                    "error analysis needs one error per example, but the metric returned one "
                    "number per batch; return a tensor of shape (batch_size,)",
                )
            return None, size, float(values)
        if values.shape != (size,):
            raise BadInput(
                "metric",
                f"expected one number per batch or a tensor of shape ({size},), "
                f"got shape {tuple(values.shape)}",
            )
        return values, size, None

    def _builtin(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() == 0 or outputs.shape[0] != _batch_size(targets, self.argument):
            raise BadInput(
                self.argument,
                f"model output of shape {tuple(outputs.shape)} does not have one row per target "
                f"(targets of shape {tuple(targets.shape)})",
            )
        if self.metric == "error":
            wrong = self._mistakes(outputs, targets)
            # Positions labelled IGNORE_INDEX (padding, the torch and Hugging Face convention)
            # count for nothing; each example's error is over its labelled positions.
            labelled = _labelled(targets, wrong.shape)
            per_position = (wrong & labelled).double().reshape(len(wrong), -1)
            counts = labelled.reshape(len(wrong), -1).sum(dim=1).clamp(min=1)
            return per_position.sum(dim=1) / counts
        difference = outputs.double() - _same_shape(targets, outputs, self.argument).double()
        wrong = difference.square() if self.metric == "mse" else difference.abs()
        return wrong.reshape(len(wrong), -1).mean(dim=1)

    def _mistakes(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-element mistakes for classification: class indices, one-hot or binary targets."""
        if _one_hot(outputs, targets):
            return outputs.argmax(dim=1) != targets.argmax(dim=1)
        if targets.is_floating_point() and not _holds_whole_numbers(targets):
            raise BadInput(
                self.argument,
                f"metric 'error' needs class labels, but the targets are floats such as "
                f"{targets.flatten()[0].item():.4g} (dtype {targets.dtype}); "
                "use metric='mse' or 'mae' for regression",
            )
        if outputs.dim() == targets.dim() + 1:
            class_dim = _class_dim(outputs, targets)
            if class_dim is not None:
                return outputs.argmax(dim=class_dim) != targets.long()
        if outputs.numel() == targets.numel():
            scores = outputs.reshape(targets.shape)
            if self.probabilities is None:
                self.probabilities = bool(((scores >= 0) & (scores <= 1)).all())
            return (scores > (0.5 if self.probabilities else 0.0)) != targets.bool()
        raise BadInput(
            self.argument,
            f"cannot read model output of shape {tuple(outputs.shape)} as class predictions for "
            f"targets of shape {tuple(targets.shape)}",
        )


def _one_hot(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """One-hot or soft labels: one row of class scores per example, each row summing to 1.

    Same-shaped 0/1 targets whose rows do not sum to 1 are multi-label: one decision each.
    """
    if outputs.shape != targets.shape or outputs.dim() < 2 or outputs.shape[1] < 2:
        return False
    return bool(torch.allclose(targets.double().sum(dim=1), torch.ones((), dtype=torch.float64)))


def _class_dim(outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
    """Where the class scores are: dim 1 (torch's ``(N, C, ...)``) or last (``(N, T, C)``)."""
    if outputs.shape[1] > 1 and outputs.shape[:1] + outputs.shape[2:] == targets.shape:
        return 1
    if outputs.shape[-1] > 1 and outputs.shape[:-1] == targets.shape:
        return -1
    return None


def _labelled(targets: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Which positions carry a label; only class-index targets can mark one as ignored."""
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.shape != shape:
        return torch.ones(shape, dtype=torch.bool, device=targets.device)
    return targets != IGNORE_INDEX


def _holds_whole_numbers(values: torch.Tensor) -> bool:
    return bool((values == values.round()).all())


def _same_shape(targets: torch.Tensor, outputs: torch.Tensor, argument: str) -> torch.Tensor:
    """Targets shaped like the outputs; a ``(N,)`` vs ``(N, 1)`` difference must not broadcast."""
    if targets.shape == outputs.shape:
        return targets
    if targets.numel() == outputs.numel():
        return targets.reshape(outputs.shape)
    raise BadInput(
        argument,
        f"model output of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)} "
        "do not hold the same number of values",
    )


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as e:
        raise BadInputType(
            "metric", f"cannot read the {what} ({type(value).__name__}) as a tensor"
        ) from e


def _batch_size(targets: Any, argument: str) -> int:
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    try:
        return len(targets)
    except TypeError:
        raise BadInputType(
            argument, f"targets of type {type(targets).__name__} have no batch dimension"
        ) from None


def _nothing_yielded(loader: Any) -> str:
    if isinstance(loader, Iterator):  # generators: one pass only
        return (
            f"the {type(loader).__name__} yielded no batches: an iterator can be read only once, "
            "and this one is used up (by an earlier split or call?); pass a list of batches or "
            "a DataLoader, which can be iterated again"
        )
    return "the loader yielded no batches (is the dataset empty?)"


def _call(model: Callable[..., Any], args: Any, kwargs: Any, argument: str, number: int) -> Any:
    """The model's predictions for one batch; a failure says which split and batch it hit."""
    try:
        return _primary_output(model(*args, **kwargs))
    except Exception as error:  # the user's model failed: say where, and re-raise it
        shapes = ", ".join(_shape_text(v) for v in [*args, *kwargs.values()])
        error.add_note(
            f"nbtrouble: raised by the model on batch {number} of {argument} "
            f"(inputs: {shapes}), evaluated in eval mode under torch.no_grad()"
        )
        raise


def _shape_text(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__} {tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def _positional_capacity(model: Any) -> int | None:
    """How many positional inputs the model takes; ``None`` when unknown or unlimited."""
    function = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds)


def _split_batch(
    batch: Any, argument: str, excluded: str | None, inputs_taken: int | None = None
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``(positional inputs, keyword inputs, targets)`` of one batch.

    A tuple holds the inputs and then the target; when it holds more than the model takes
    (``(x, y, sample_weight)`` for ``forward(x)``), the element after the inputs the model
    takes is the target and the rest (weights, ids) is not used.
    """
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise BadInput(
                argument,
                f"a dict batch needs a 'labels' or 'label' key; got keys {sorted(map(str, batch))}",
            )
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS and k != excluded}
        return (), inputs, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        if inputs_taken is not None and 0 < inputs_taken < len(batch) - 1:
            return tuple(batch[:inputs_taken]), {}, batch[inputs_taken]
        return tuple(batch[:-1]), {}, batch[-1]
    raise BadInputType(
        argument,
        "each batch must be (inputs, targets) or a dict with a 'labels' key, "
        f"got {type(batch).__name__}",
    )


def _primary_output(output: Any) -> Any:
    """The predictions inside a model's output (Hugging Face outputs carry ``logits``)."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


@dataclass(frozen=True)
class _Placement:
    """Where a module's batches go: its device, and its float dtype for float inputs.

    Numpy arrays become tensors. A plain callable (not an ``nn.Module``) gets batches as
    they are.
    """

    module: bool = False
    device: torch.device | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def of(cls, model: Any) -> _Placement:
        if not isinstance(model, torch.nn.Module):
            return cls()
        tensors = [*model.parameters(), *model.buffers()]
        floats = [t for t in tensors if t.is_floating_point()]
        device = tensors[0].device if tensors else None
        return cls(True, device, floats[0].dtype if floats else None)

    def inputs(self, value: Any) -> Any:
        # float64 numpy features fed to a float32 model are the common case: evaluate them
        # in the model's dtype instead of failing on the first matmul.
        return self._convert(value, self.dtype)

    def targets(self, value: Any) -> Any:
        return self._convert(value, None)

    def _convert(self, value: Any, dtype: torch.dtype | None) -> Any:
        if not self.module:
            return value
        if isinstance(value, np.ndarray) and value.dtype != object:
            value = torch.from_numpy(value)
        if isinstance(value, torch.Tensor):
            cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
            return value.to(device=self.device or value.device, dtype=cast)
        if isinstance(value, Mapping):
            return {k: self._convert(v, dtype) for k, v in value.items()}
        if isinstance(value, list):
            return [self._convert(v, dtype) for v in value]
        if isinstance(value, tuple):
            moved = [self._convert(v, dtype) for v in value]
            return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
        return value


@contextmanager
def _preserved_state(model: Any) -> Iterator[None]:
    """Eval mode for the model; every ``training`` flag and RNG state restored afterwards."""
    flags = {m: m.training for m in model.modules()} if isinstance(model, torch.nn.Module) else {}
    rng = _rng_state()
    try:
        if isinstance(model, torch.nn.Module):
            model.eval()
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag
        _set_rng_state(rng)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _progress_bar(loader: Iterable[Any], argument: str, enabled: bool) -> Iterator[Iterable[Any]]:
    from tqdm.auto import tqdm

    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:  # generators, and DataLoaders over an IterableDataset without a length
        total = None
    bar = tqdm(loader, desc=f"{argument} error", total=total, disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------
# Slices
# ---------------------------------------------------------------------------------------


def _excluded_key(slices: Any) -> str | None:
    return slices if isinstance(slices, str) else None


def _slice_labels(
    slices: Callable[[Any], Sequence[Any]] | str, batch: Any, size: int, argument: str
) -> list[Any]:
    if isinstance(slices, str):
        if not isinstance(batch, Mapping) or slices not in batch:
            raise BadInput("slices", f"{slices!r} is not a key of the {argument} batches")
        labels = batch[slices]
    else:
        labels = slices(batch)
    labels = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
    if len(labels) != size:
        raise BadInput(
            "slices", f"gave {len(labels)} labels for a {argument} batch of {size} examples"
        )
    return labels


def _tags(label: Any) -> tuple[Any, ...]:
    """An example's slices: one label, several (a list or set of tags), or none (``None``)."""
    if label is None:
        return ()
    if isinstance(label, (list, tuple, set, frozenset)):
        return tuple(label)
    return (label,)


# ---------------------------------------------------------------------------------------
# The error-analysis table
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceRow:
    """One slice of the error-analysis table (errors as the metric measures them)."""

    slice: str
    n_train_val: int
    n_test_val: int
    error_train_val: float  # mean error inside the slice, NaN when it holds no example
    error_test_val: float
    share: float  # the slice's part of the total error on the reference set
    gain: (
        float  # how much the reference set's mean error drops if the slice did as well as the rest
    )


@dataclass(frozen=True)
class ErrorAnalysis:
    """The lecture's error-analysis table: error per slice, sorted by what fixing it gains.

    ``reference`` is the set the shares and gains are computed on: ``"test_val"`` when a
    test-distribution validation set was given (the distribution that matters), else
    ``"train_val"``.
    """

    rows: list[SliceRow]
    error_train_val: float
    error_test_val: float | None
    reference: str
    metric: str = "error"
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        from nbtrouble._biasvar_view import error_analysis_text

        return error_analysis_text(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_html_(self) -> str:
        from nbtrouble._biasvar_view import error_analysis_html

        return error_analysis_html(self)


def error_analysis(
    model: Callable[..., Any] | None = None,
    *,
    train_val: Any,
    test_val: Any = None,
    slices: Callable[[Any], Sequence[Any]] | str | None = None,
    metric: str | Callable[..., Any] = "error",
    progress: bool = True,
) -> ErrorAnalysis:
    """Error per slice of the data ("night", "reflection", ...) on both validation sets.

    Parameters
    ----------
    model
        ``None`` when the per-example errors are already known, else the model to evaluate.
    train_val, test_val
        Without a model: ``(errors, labels)`` pairs, one error (a 0/1 mistake or a loss) and one
        slice label per example. With a model: data loaders (see this module's docstring).
        ``test_val`` is the validation set drawn from the test distribution; optional.
    slices
        With a model: a function ``slices(batch) -> one label per example``, or the key of
        dict batches that holds the labels. A label may be a string, a list of tags (an
        example in several slices), or ``None`` (in no slice).
    metric
        ``"error"``, ``"mse"``, ``"mae"`` or ``metric(outputs, targets)`` returning one error
        per example (a tensor of shape ``(batch_size,)``).

    Returns
    -------
    ErrorAnalysis
        Rows sorted by ``gain``: how much the reference set's mean error would drop if the
        slice's error fell to that of the examples outside it. ``share`` is the slice's part
        of all the error (shares of overlapping slices can add up to more than 1).

    Examples
    --------
    >>> ea = error_analysis(train_val=([0, 1, 0, 0], ["day", "night", "day", "night"]),
    ...                     test_val=([1, 1, 0, 0], ["night", "night", "day", "day"]))
    >>> ea.rows[0].slice
    'night'
    """
    check_metric(metric)
    if model is None:
        if slices is not None:
            raise BadInput(
                "slices", "give slices with a model; without one, pass (errors, labels) pairs"
            )
        tv = _given_examples(train_val, "train_val")
        testv = _given_examples(test_val, "test_val") if test_val is not None else None
    else:
        check_model(model)
        if slices is None:
            raise BadInput(
                "slices",
                "missing: a function of the batch giving one label per example, or a dict key",
            )
        if not (callable(slices) or isinstance(slices, str)):
            raise BadInputType(
                "slices", f"expected a function or a dict key, got {type(slices).__name__}"
            )
        tv = measure(
            model, train_val, metric, argument="train_val", progress=progress, slices=slices
        )
        testv = None
        if test_val is not None:
            testv = measure(
                model, test_val, metric, argument="test_val", progress=progress, slices=slices
            )
    return _table(
        tv, testv, metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    )


def _given_examples(pair: Any, argument: str) -> Measured:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise BadInputType(
            argument,
            "without a model, pass an (errors, labels) pair: one error and one label per example",
        )
    errors_in, labels_in = pair
    try:
        errors = np.asarray(
            errors_in.detach().cpu() if isinstance(errors_in, torch.Tensor) else errors_in,
            dtype=float,
        )
    except (TypeError, ValueError) as e:
        raise BadInputType(argument, f"errors must be numbers: {e}") from None
    labels = (
        labels_in.tolist() if isinstance(labels_in, (np.ndarray, torch.Tensor)) else list(labels_in)
    )
    if errors.ndim != 1 or len(errors) == 0:
        raise BadInput(
            argument, f"errors must be a non-empty 1-d sequence, got shape {errors.shape}"
        )
    if len(labels) != len(errors):
        raise BadInput(argument, f"{len(errors)} errors but {len(labels)} slice labels")
    if not np.all(np.isfinite(errors)) or np.any(errors < 0):
        raise BadInput(argument, "errors must be finite and non-negative")
    return Measured(float(errors.mean()), len(errors), errors, labels)


def _table(train_val: Measured, test_val: Measured | None, metric: str) -> ErrorAnalysis:
    reference = test_val if test_val is not None else train_val
    names = sorted(
        {
            str(t)
            for m in (train_val, test_val)
            if m is not None
            for label in m.slices or []
            for t in _tags(label)
        }
    )
    rows = [_row(name, train_val, test_val, reference) for name in names]
    rows.sort(key=lambda r: (-r.gain, -r.share, r.slice))
    notes = []
    if test_val is None:
        notes.append(
            "No test-distribution validation set: shares and gains are on the train-validation "
            "set. Hold out part of the test distribution to see which slices the shift hurts."
        )
    return ErrorAnalysis(
        rows=rows,
        error_train_val=train_val.mean,
        error_test_val=test_val.mean if test_val is not None else None,
        reference="test_val" if test_val is not None else "train_val",
        metric=metric,
        notes=notes,
    )


def _row(
    name: str, train_val: Measured, test_val: Measured | None, reference: Measured
) -> SliceRow:
    n_tv, err_tv = _slice_error(train_val, name)
    n_testv, err_testv = _slice_error(test_val, name) if test_val is not None else (0, math.nan)
    errors, inside = _membership(reference, name)
    total = float(errors.sum())
    inside_sum = float(errors[inside].sum())
    rest = errors[~inside]
    rest_mean = float(rest.mean()) if len(rest) else 0.0
    # Fixing a slice means bringing it to the error of everything else, not to zero.
    gain = max(inside_sum - rest_mean * int(inside.sum()), 0.0) / len(errors)
    share = inside_sum / total if total > 0 else 0.0
    return SliceRow(name, n_tv, n_testv, err_tv, err_testv, share, gain)


def _membership(measured: Measured, name: str) -> tuple[np.ndarray, np.ndarray]:
    errors = measured.per_example
    assert errors is not None and measured.slices is not None  # both collected when slicing
    inside = np.array([name in map(str, _tags(label)) for label in measured.slices], dtype=bool)
    return errors, inside


def _slice_error(measured: Measured, name: str) -> tuple[int, float]:
    errors, inside = _membership(measured, name)
    count = int(inside.sum())
    return count, float(errors[inside].mean()) if count else math.nan
