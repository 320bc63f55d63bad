"""Where in a model an exception was raised: the module whose forward was running, read from the
traceback after the fact (scan errors and data-vs-model checks both name it)."""

from __future__ import annotations

from torch import fx, nn


def raised_in(e: BaseException, model: nn.Module, runner: nn.Module | None = None) -> str:
    """`` in module NAME (Type)``: the innermost of ``model``'s modules whose forward was running when ``e``
    was raised, found after the fact by walking the traceback for frames whose ``self`` is one of them
    (so a forward pays nothing for it); ``""`` if none. In a traced part's generated forward, the
    failing line's node names the module its op came from (fx's ``nn_module_stack``). ``runner``: a
    GraphModule standing in for the whole model."""
    names = {id(m): name for name, m in model.named_modules()}
    if runner is not None and runner is not model:
        names.setdefault(id(runner), "")
    found = None
    tb = e.__traceback__
    while tb is not None:  # outermost first: the last match is the innermost module
        frame = tb.tb_frame
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names:
            found = (names[id(obj)], type(obj).__name__)
            if isinstance(obj, fx.GraphModule):
                found = _traced_origin(obj, names[id(obj)], frame, tb.tb_lineno) or (found[0], "traced")
        tb = tb.tb_next
    if found is None:
        return ""
    return f" in module {found[0]} ({found[1]})" if found[0] else f" in the model's own forward ({found[1]})"


def _traced_origin(gm: fx.GraphModule, path: str, frame, lineno: int) -> tuple[str, str] | None:
    """The module a line of ``gm``'s generated forward came from: the line assigns one node (``name = op(...)``)."""
    import linecache

    if not frame.f_code.co_filename.startswith("<eval_with_key"):
        return None
    target = linecache.getline(frame.f_code.co_filename, lineno).split("=", 1)[0].strip()
    node = next((n for n in gm.graph.nodes if n.name == target), None)
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    if not stack:
        return None
    inner, kind = list(stack.values())[-1]
    name = inner if not path else f"{path}.{inner}"
    return name, kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
