"""Tool calls: BFCL's AST match of a reply's function calls against the `possible_answer` entries.

Follows BFCL's official Python checker (bfcl_eval/eval_checker/ast_eval/ast_checker.py, and its ast_parse):
  - positional arguments are dropped, as its parser reads only keyword arguments (a required parameter passed
    positionally then counts as missing);
  - a tuple becomes a list only where the parameter is declared "tuple" (answers went through JSON); a tuple
    for an "array" is a type error;
  - types are exact (`type(v) is int`: a bool is not an integer), an int is promoted to float only for a
    top-level "float" parameter; the items of an "array" / "tuple" are checked against each possible answer
    that is a list, and an answer that is not a list (the optional marker "") passes the item check, as there;
  - a value whose type differs from the declared one but equals the type of the possible answers is a
    variable name (compared as is); strings are compared after BFCL's standardisation.
"""
from __future__ import annotations

import ast
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable

from stages.verifiers.result import VerifierResult, strip_reasoning

class ToolCallParseError(ValueError):
    pass


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: dict


_SAFE_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


def _literal(node: ast.AST) -> Any:
    """A call argument's value: literals, lists, tuples, dicts, negative numbers, bare names (as strings,
    BFCL's convention for variables), nested calls (with keyword arguments as {name: arguments}, as BFCL's
    parser; else as their source) and + - * / on numbers; never eval."""
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if not isinstance(value, (int, float)):
            raise ToolCallParseError(f"unary minus on a non-number: {ast.unparse(node)}")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List):
        return [_literal(v) for v in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(v) for v in node.elts)
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call) and node.keywords:
        return {_call_name(node.func): _keyword_arguments(node)}
    if isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
        return ast.unparse(node)
    if isinstance(node, ast.BinOp) and type(node.op) in _SAFE_BINOPS:
        a, b = _literal(node.left), _literal(node.right)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            try:
                return _SAFE_BINOPS[type(node.op)](a, b)
            except ZeroDivisionError as exc:
                raise ToolCallParseError(f"division by zero in {ast.unparse(node)}") from exc
    raise ToolCallParseError(f"unsupported argument expression: {ast.unparse(node)}")


def _call_name(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise ToolCallParseError(f"not a function name: {ast.unparse(func)}")
    parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword_arguments(node: ast.Call) -> dict:
    """The keyword arguments of a call; positional ones are dropped, as BFCL's parser drops them."""
    if any(kw.arg is None for kw in node.keywords):
        raise ToolCallParseError(f"**kwargs in a call: {ast.unparse(node)[:200]}")
    return {kw.arg: _literal(kw.value) for kw in node.keywords}


def _json_calls(obj: Any) -> list[FunctionCall]:
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item:
            raise ToolCallParseError(f"a JSON tool call needs a name: {json.dumps(item)[:200]}")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(args, dict):
            raise ToolCallParseError(f"arguments of {item['name']} are not an object")
        calls.append(FunctionCall(str(item["name"]), args))
    return calls


def parse_function_calls(text: str) -> list[FunctionCall]:
    """Function calls in a model reply: JSON (`{"name":..., "arguments":...}`, a list of them, or
    `<tool_call>` blocks) or Python call syntax (`f(a=1)`, `[f(a=1), g(b=[2])]`), code fences stripped."""
    text = strip_reasoning(text).strip()
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
    fenced = re.fullmatch(r"```[a-zA-Z]*\n?(.*?)\n?```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        if blocks:
            return [c for block in blocks for c in _json_calls(json.loads(block))]
        if text[:1] in "{[" and not re.match(r"\[\s*[A-Za-z_]", text):
            return _json_calls(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ToolCallParseError(f"invalid JSON tool call: {exc}") from exc
    source = text if text.startswith("[") else f"[{text}]"
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise ToolCallParseError(f"not a Python call list: {exc.msg}") from exc
    elts = tree.body.elts if isinstance(tree.body, ast.List) else [tree.body]
    calls = []
    for node in elts:
        if not isinstance(node, ast.Call):
            raise ToolCallParseError(f"not a function call: {ast.unparse(node)[:200]}")
        calls.append(FunctionCall(_call_name(node.func), _keyword_arguments(node)))
    return calls


# BFCL's PYTHON_TYPE_MAPPING: "tuple" values are compared as lists, "any" is checked as a string.
BFCL_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
              "dict": dict, "any": str}


def _standardize(s: str) -> str:
    """BFCL's string comparison: spaces and ,./-_*^ removed, lower case, ' -> "."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _std(v: Any) -> Any:
    return _standardize(v) if isinstance(v, str) else v


def _dict_matches(value: dict, allowed: list) -> str | None:
    """None when the dict matches one allowed dict (each key's value among that key's allowed values,
    keys allowed to be missing only when "" is among their values), else why not."""
    why = f"no allowed value matches {value!r}"
    for option in allowed:
        if option == "":
            continue
        bad = next((k for k in value if k not in option or _std(value[k]) not in [_std(a) for a in option[k]]),
                   None)
        missing = next((k for k, vals in option.items() if k not in value and "" not in vals), None)
        if bad is None and missing is None:
            return None
        why = f"dict key {bad!r} has a value not allowed" if bad is not None else f"dict key {missing!r} missing"
    return why


def _type_ok(value: Any, expected: type, item_type: type | None, allowed: list) -> tuple[bool, bool]:
    """(ok, is_variable), BFCL's type_checker: the value has exactly the declared type (for arrays: its items
    have the item type, or the type of that possible answer's items, for at least one possible answer; an
    answer that is not a list passes), or the type of the possible answers when that differs from the
    declared one (BFCL's convention for a variable name)."""
    answer_type = next((type(a) for a in allowed if a != ""), None)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if item_type is None or any(type(option) is not list
                                    or all(_type_ok(x, item_type, None, option)[0] for x in value)
                                    for option in allowed):
            return True, is_variable
        return False, False
    return answer_type is not None and type(value) is answer_type, True


def match_one_call(call: FunctionCall, function: dict, answer: dict) -> str | None:
    """None when `call` matches one BFCL ground-truth entry {name: {param: [allowed values]}}, else why."""
    name, allowed_params = next(iter(answer.items()))
    if call.name != name:
        return f"function {call.name!r} is not {name!r}"
    schema = function["parameters"]
    properties, required = schema.get("properties", {}), schema.get("required", [])
    for param in required:
        if param not in call.arguments:
            return f"{name}: missing required parameter {param!r}"
    for param, value in call.arguments.items():
        if param not in properties or param not in allowed_params:
            return f"{name}: unexpected parameter {param!r}"
        allowed = allowed_params[param]
        declared = properties[param]["type"]
        expected = BFCL_TYPES.get(declared, str)
        item_type = None
        if declared in ("array", "tuple"):
            item_type = BFCL_TYPES.get(properties[param].get("items", {}).get("type"))
        if declared == "tuple" and type(value) is tuple:  # answers went through JSON, as BFCL converts
            value = list(value)
        if expected is float and type(value) is int:  # BFCL allows Python's int -> float promotion
            value = float(value)
        ok, is_variable = _type_ok(value, expected, item_type, allowed)
        if not ok:
            return f"{name}: parameter {param!r} should be {declared}, got {type(value).__name__}"
        if not is_variable and expected is dict:
            why = _dict_matches(value, allowed)
        elif not is_variable and expected is list and item_type is dict:
            options = [opt for opt in allowed if opt != "" and len(opt) == len(value)]
            why = None if any(all(_dict_matches(v, [o]) is None for v, o in zip(value, opt)) for opt in options) \
                else "list of dicts not among the allowed values"
        elif not is_variable and expected in (str, list):
            std_value = [_std(v) for v in value] if expected is list else _std(value)
            std_allowed = [[_std(v) for v in a] if isinstance(a, list) else _std(a) for a in allowed]
            why = None if std_value in std_allowed else "value not among the allowed values"
        else:
            why = None if value in allowed else "value not among the allowed values"
        if why is not None:
            return f"{name}: parameter {param!r} = {value!r}: {why} {allowed!r}"
    for param, allowed in allowed_params.items():
        if param not in call.arguments and "" not in allowed:
            return f"{name}: parameter {param!r} missing and not optional"
    return None


def match_function_calls(calls: list[FunctionCall], functions: list[dict],
                         possible_answer: list[dict]) -> str | None:
    """BFCL AST check, order-free: as many calls as ground-truth entries, and each entry matched by a
    distinct call (greedy, in ground-truth order, as BFCL's checker does). None when all match, else why."""
    if len(calls) != len(possible_answer):
        return f"wrong number of calls: {len(calls)} for {len(possible_answer)} expected"
    by_name = {f["name"]: f for f in functions}
    used: set[int] = set()
    for answer in possible_answer:
        name = next(iter(answer))
        if name not in by_name:
            return f"ground truth names {name!r}, which is not among the functions"
        why = f"no call matches {name!r}"
        for i, call in enumerate(calls):
            if i in used:
                continue
            reason = match_one_call(call, by_name[name], answer)
            if reason is None:
                used.add(i)
                break
            why = reason
        else:
            return why
    return None


def verify_tool_calls(completion: str, functions: list[dict], possible_answer: list[dict]) -> VerifierResult:
    """1 when the reply's function calls match BFCL's possible answers (AST match), else 0."""
    start = time.perf_counter()
    try:
        calls = parse_function_calls(completion)
    except (ToolCallParseError, RecursionError) as exc:
        return VerifierResult(0.0, f"unparseable: {exc}", time.perf_counter() - start)
    why = match_function_calls(calls, functions, possible_answer)
    return VerifierResult(float(why is None), why or "all calls match", time.perf_counter() - start)


def _example_value(allowed: list) -> Any:
    """The first allowed value that is not the "optional" marker, with BFCL's nested dict form
    {key: [allowed values]} resolved the same way."""
    value = next((v for v in allowed if v != ""), "")
    if isinstance(value, dict):
        return {k: _example_value(vs) for k, vs in value.items() if any(v != "" for v in vs)}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [{k: _example_value(vs) for k, vs in d.items() if any(v != "" for v in vs)} for d in value]
    return value


def call_source(answer: dict) -> str:
    """A ground-truth entry written as the Python call it describes (first allowed value of each parameter,
    parameters that may only be absent left out): what a perfect model would answer."""
    name, params = next(iter(answer.items()))
    args = ", ".join(f"{k}={_example_value(v)!r}" for k, v in params.items() if any(x != "" for x in v))
    return f"{name}({args})"


def calls_source(possible_answer: Iterable[dict]) -> str:
    return "[" + ", ".join(call_source(a) for a in possible_answer) + "]"
