"""Optional ``torch.compile`` of a model's parts, with a first call that compiles at once so
that a machine without a working compiler fails with one line before any real work."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from slimseg.errors import SlimsegError

MODEL_PARTS = ("image_encoder", "mask_decoder")


def compile_model(model: torch.nn.Module, parts: Sequence[str] = MODEL_PARTS) -> None:
    """Replace the model's ``parts`` (attribute names) by ``torch.compile`` wrappers; they
    compile on their first call, and again for new input shapes."""
    unknown = [part for part in parts if not isinstance(getattr(model, part, None), torch.nn.Module)]
    if unknown:
        raise SlimsegError(f"cannot compile {', '.join(unknown)}: {type(model).__name__} has no such module")
    try:
        for part in parts:
            setattr(model, part, torch.compile(getattr(model, part)))
    except Exception as error:  # torch raises RuntimeError and others where dynamo is unsupported
        raise compile_error(error) from error


def compile_error(error: Exception) -> SlimsegError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return SlimsegError(f"--compile: torch.compile does not work on this machine ({type(error).__name__}: {reason})")


def first_compiled_call(work: Callable[[], object]) -> None:
    """Run ``work`` (a call of the compiled parts) now: compilation errors become one line."""
    try:
        with torch.inference_mode():
            work()
    except SlimsegError:
        raise
    except Exception as error:
        raise compile_error(error) from error
