"""Generate ``docs/configs.md`` from the config dataclasses and the shipped YAML files.

The reference tables come from the field docstrings in ``vespo_megatron/config/`` (read with ``ast``,
so the docs cannot drift from the code), the list of shipped configs from the comment block at the
top of each ``configs/*.yaml``, and the sample output from running ``check-config`` itself.
``tests/unit/test_layout_estimates.py`` checks that the committed file equals :func:`render_markdown`.

Regenerate with ``python -m vespo_megatron.config_docs --write``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
REPO_DIR = PACKAGE_DIR.parent
CONFIG_SOURCES = sorted((PACKAGE_DIR / "config").glob("*.py"))
CONFIGS_DIR = REPO_DIR / "configs"
DOC_PATH = REPO_DIR / "docs" / "configs.md"

SAMPLES = [
    ["configs/qwen3_30b_a3b_moe.yaml", "--nodes", "4", "--gpus-per-node", "8"],
    ["configs/qwen3_30b_a3b_moe.yaml", "--nodes", "1", "--gpus-per-node", "6"],
    ["configs/qwen3_8b_dense.yaml", "--nodes", "1", "--gpus-per-node", "8", "parallel.tp=1",
     "parallel.sequence_parallel=false"],
    ["configs/tiny_moe_cpu.yaml", "--nodes", "1", "--gpus-per-node", "3", "parallel.ep=3"],
]


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _fields(cls: ast.ClassDef) -> list[tuple[str, str, str, str]]:
    """(name, type, default, docstring) of each annotated attribute, in source order."""
    out = []
    body = cls.body
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        doc = ""
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        default = ast.unparse(node.value) if node.value is not None else "required"
        out.append((node.target.id, ast.unparse(node.annotation), default, doc))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_reference(source: str | None = None) -> str:
    """Markdown tables of every key of every section of ``Config``, from the field docstrings."""
    sources = [source] if source is not None else [path.read_text() for path in CONFIG_SOURCES]
    classes = {}
    for text in sources:
        classes.update(_classes(ast.parse(text)))
    lines = []
    for section, type_name, _default, _doc in _fields(classes["Config"]):
        cls = classes.get(type_name)
        if cls is None:
            continue
        summary = " ".join((ast.get_docstring(cls) or "").split())
        lines += [f"### `{section}`", "", summary, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, annotation, default, doc in _fields(cls):
            lines.append(f"| `{section}.{name}` | `{_cell(annotation)}` | `{_cell(default)}` | {_cell(doc)} |")
            nested = classes.get(annotation)  # a sub-section declared in config/ (e.g. rollout.vllm): its keys too
            for sub, sub_annotation, sub_default, sub_doc in _fields(nested) if nested is not None else []:
                lines.append(f"| `{section}.{name}.{sub}` | `{_cell(sub_annotation)}` | `{_cell(sub_default)}` | "
                             f"{_cell(sub_doc)} |")
        lines.append("")
    return "\n".join(lines)


def _header_comment(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines).strip()


def render_shipped_configs() -> str:
    parts = []
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        parts += [f"### `configs/{path.name}`", "", "```text", _header_comment(path), "```", ""]
    return "\n".join(parts)


def _sample(argv: list[str]) -> str:
    from vespo_megatron.check_config import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(REPO_DIR / argv[0]), *argv[1:]])
    text = (out.getvalue() + err.getvalue()).rstrip()
    return f"$ vespo-megatron check-config {' '.join(argv)}\n{text}\n(exit status {code})"


INTRO = """# Configuration

A run is one YAML file with the sections below; every key is optional and defaults as listed.
Override any key on the command line with `section.key=value` (the value is parsed as YAML):

```bash
vespo-megatron train configs/tiny_dense_cpu.yaml parallel.tp=1 optimizer.lr=3e-4
```

Unknown keys, wrong types and malformed overrides are errors. Single-section checks run when a section
is built; checks that relate sections to each other and to the world size run in
`vespo_megatron.config.validate(config, world_size)` before any process group exists, so a bad layout
fails in milliseconds with a message that names the fields, their values and a fix.

This file is generated by `python -m vespo_megatron.config_docs --write` from the field docstrings in
`vespo_megatron/config/`, the header comments of `configs/*.yaml` and `check-config` itself; a test
fails when it is stale.
"""

CHECK_CONFIG = """## Checking a layout: `check-config`

```bash
vespo-megatron check-config CONFIG --nodes N --gpus-per-node G [--gpu-memory-gb 80] [--overhead-gb 2] \\
    [--vocab-size V] [--json] [section.key=value ...]
# the same without the console script:
python -m vespo_megatron.check_config CONFIG --nodes N --gpus-per-node G ...
```

It validates the config for `N * G` ranks without starting process groups (no Megatron import) and prints

- the rank grid Megatron-Core builds (order `tp-cp-ep-dp-pp`): every process-group kind with its count
  and size and the first groups, and which kinds span nodes (a warning when tp, cp or etp groups do);
- parameters in total, active per token (MoE), and per GPU of each pipeline stage (dense and expert);
- memory per GPU of each stage: weights, gradients, Adam state (sharded by the distributed optimizer),
  activations (a Korthikanti et al. per-layer estimate adapted to GQA, SwiGLU and MoE; the formulas are in
  `vespo_megatron/estimates.py`) and a flat overhead; rollout KV caches are not included;
- the VESPO loss's communication: one `[2, B]` fp32 all-reduce per micro-batch over the tp x cp group,
  against the `[B, S]` all-gather of token log-probs a token-level design needs.

Exit status: 0 valid and fits, 2 invalid config (the message says which fields and how to fix it),
3 the estimate exceeds `--gpu-memory-gb`. `--json` prints the same report as one JSON object
(`{"ok": false, "error": ...}` for an invalid config). The rank grid is checked against the groups
Megatron really builds, and the per-rank parameter counts against real builds, in
`tests/dist/test_param_counts.py`.

Samples:
"""


def render_markdown() -> str:
    """The whole of ``docs/configs.md``."""
    samples = "\n\n".join(f"```text\n{_sample(argv)}\n```" for argv in SAMPLES)
    return "\n".join(
        [
            INTRO,
            "## Sections and keys",
            "",
            render_reference(),
            "## Shipped configs",
            "",
            "Each is loaded and validated at its intended world size by `tests/unit/test_config.py`.",
            "",
            render_shipped_configs(),
            CHECK_CONFIG,
            samples,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render_markdown()
    if "--write" in argv:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
