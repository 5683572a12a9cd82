"""Read the PromQL out of a Grafana dashboard's JSON, and make it sendable to a real Prometheus.

    for where, expr in queries(json.loads(Path("dashboards/grafana/train.json").read_text())):
        requests.get(f"{prom}/api/v1/query", params={"query": instantiate(expr, run="digits-demo")})

`queries` lists every query a dashboard sends: each panel target (panels inside collapsed rows
too), each annotation query, and each template variable's query, the last translated from
Grafana's `label_values(metric, label)` into the PromQL that lists the same values
(`count by (label) (metric)`). `instantiate` replaces Grafana's variables (`$run`, `${run}`,
`${run:regex}`, `[[run]]`, `$__interval`, `$__rate_interval`, `$__range`, ...) with concrete values the
way Grafana's Prometheus data source does, so the result is plain PromQL. Nothing here imports
the Grafana SDK: a test that only reads the committed JSON needs none of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# $name, ${name}, ${name:format}, [[name]], [[name:format]] (Grafana's variable syntaxes).
VARIABLE = re.compile(r"\$\{(?P<a>\w+)(?::(?P<fa>\w+))?\}|\[\[(?P<b>\w+)(?::(?P<fb>\w+))?\]\]|\$(?P<c>\w+)")

# Grafana's global variables and the values `instantiate` gives them unless told otherwise. A
# range of 1 minute holds 4 samples at Prometheus' 15 s default scrape interval (what
# $__rate_interval guarantees); $__range is the dashboard's time range.
BUILTINS = {
    "__interval": "1m", "__interval_ms": "60000", "__rate_interval": "1m", "__rate_interval_ms": "60000",
    "__range": "1h", "__range_s": "3600", "__range_ms": "3600000",
}

# Grafana's template-variable functions for Prometheus, translated to PromQL with the same answer.
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<expr>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\(\s*(?P<expr>.+)\s*\)\s*$", re.S)
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def _panels(panels: Iterable[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # a collapsed row holds its panels


def variable_query(query: str | dict) -> str:
    """The PromQL behind a query variable's `query` (a string, or Grafana 10+'s `{"query": ...}`)."""
    text = query.get("query", "") if isinstance(query, dict) else query
    if match := _LABEL_VALUES.match(text):
        return f"count by ({match['label']}) ({match['expr']})"
    if match := _QUERY_RESULT.match(text):
        return match["expr"]
    raise ValueError(f"variable query {text!r}: only label_values(metric, label) and query_result(expr) are known; "
                     "label_values(label) (no metric) asks Prometheus for every series")


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every query of a dashboard JSON, in the dashboard's order: panel
    targets ("<panel title>", or "<panel title> [refId]" where a panel has several), annotations
    ("annotation: <name>"), query variables ("variable: <name>"). Hidden targets count (Grafana
    still evaluates them for expressions); the built-in Grafana annotation has no PromQL."""
    out: list[tuple[str, str]] = []
    for panel in _panels(dashboard.get("panels") or []):
        targets = [t for t in panel.get("targets") or [] if t.get("expr")]
        for target in targets:
            title = panel.get("title", "")
            if len(targets) > 1:
                title += f" [{target.get('refId', '?')}]"
            out.append((title, target["expr"]))
    for annotation in (dashboard.get("annotations") or {}).get("list") or []:
        expr = annotation.get("expr") or (annotation.get("target") or {}).get("expr")
        if expr:
            out.append((f"annotation: {annotation.get('name', '')}", expr))
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query":
            out.append((f"variable: {variable['name']}", variable_query(variable.get("query") or "")))
    return out


def variables_used(expr: str) -> set[str]:
    """The names of the Grafana variables in `expr` (`$__interval` gives `__interval`)."""
    return {m["a"] or m["b"] or m["c"] for m in VARIABLE.finditer(expr)}


def defined_variables(dashboard: dict) -> set[str]:
    """The variables a dashboard defines (templating) plus Grafana's global ones."""
    return {v["name"] for v in (dashboard.get("templating") or {}).get("list") or []} | set(BUILTINS) | {
        "__all_variables", "__dashboard", "__from", "__to", "__name", "__org", "__user", "__timeFilter"}


def regex_escape(value: str) -> str:
    """A label value escaped as Grafana escapes a multi-value variable for Prometheus: regex
    metacharacters get a backslash, and every backslash is doubled for PromQL's string literal,
    so `a.b` is matched literally by `run=~"a\\\\.b"`."""
    return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def _format(value: str | Iterable[str], fmt: str | None) -> str:
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        raise ValueError("a variable needs at least one value")
    if fmt == "raw":
        return ",".join(values)
    if fmt == "pipe":
        return "|".join(values)
    if fmt == "csv":
        return ",".join(values)
    escaped = [regex_escape(v) for v in values]  # Grafana's default for Prometheus, and :regex
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def _seconds(duration: str) -> float:
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"{duration!r} is not a Prometheus duration (e.g. 30s, 1m, 1h30m)")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _builtin(name: str, values: dict) -> str:
    """A Grafana global variable: given as `__interval=` or `interval=`, derived (`__range_s`
    from `range`), or BUILTINS' default."""
    for key in (name, name[2:]):
        if key in values:
            return str(values[key])
    for suffix, factor in (("_ms", 1000), ("_s", 1)):
        if name.endswith(suffix) and name.removesuffix(suffix) in BUILTINS:
            seconds = _seconds(_builtin(name.removesuffix(suffix), values))
            return str(int(seconds * factor))
    if name in BUILTINS:
        return BUILTINS[name]
    raise KeyError(name)


def instantiate(expr: str, **values: str | Iterable[str]) -> str:
    """`expr` with every Grafana variable replaced: `instantiate(e, run="digits-demo")`,
    `instantiate(e, run=["a", "b"], interval="15s", rate_interval="1m", range="1h")`. A value is
    one label value or a list (several selected: `(a|b)`); values are regex-escaped as Grafana does
    for the `=~` matchers the dashboards use (`${v:raw}` / `${v:pipe}` are not). Grafana's global
    variables ($__interval, $__rate_interval, $__range, their _s/_ms forms) are given with or
    without the leading `__`, or default to `BUILTINS`. A variable without a value raises
    ValueError naming it."""

    def sub(match: re.Match) -> str:
        name = match["a"] or match["b"] or match["c"]
        if name.startswith("__"):
            try:
                return _builtin(name, values)
            except KeyError:
                pass
        elif name in values:
            return _format(values[name], match["fa"] or match["fb"])
        raise ValueError(f"{expr!r}: no value for ${name}; pass instantiate(expr, {name.lstrip('_')}=...)")

    return VARIABLE.sub(sub, expr)


def needs_gpu(title: str, expr: str) -> bool:
    """Whether a query reads Ray's GPU metrics (no series on a machine without a GPU)."""
    return any(m.startswith(("ray_node_gpu", "ray_node_gram")) for m in metric_names(expr))


def conditional(title: str, expr: str) -> bool:
    """Whether a query may rightly return nothing for a healthy run: annotations (they mark phase
    changes and rollbacks, `> 0`) and panels of series only some methods or configs export
    (`CONDITIONAL_PANELS`), besides the GPU ones (`needs_gpu`)."""
    return (title.startswith("annotation: ") or needs_gpu(title, expr)
            or title.split(" [", 1)[0] in CONDITIONAL_PANELS)


# Panels whose series exist only for some methods/configs: loss terms and logits (AFM), gn_scale
# (AFM's gradient normaliser), augmentation, other per-step values (e.g. the classifier's acc), evaluation
# metrics other than fd/fid/cls_acc, classifier accuracy (an evaluation that computes it).
CONDITIONAL_PANELS = {"Loss terms", "Discriminator logits (real / fake)", "Other per-step metrics",
                      "Gradient norms and gn_scale", "Augmentation probability", "Other evaluation metrics",
                      "Classifier accuracy by NFE", "Loss weights (λ)"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers before `{` or standing alone that are
    not PromQL functions, keywords or label names inside a matcher / by() / on() list)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values cannot hold a metric name
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors: [1m], [$__interval]
    text = re.sub(r"\{[^}]*\}", "{}", text)  # matchers: their label names are no metrics
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = VARIABLE.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\(|\{|)", text):
        word, opener = match.group(1), match.group(2)
        if opener == "(" or word in _KEYWORDS:
            continue  # a function call or an operator word
        names.add(word)
    return names


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "atmodifier", "inf", "nan", "Inf", "NaN"}
