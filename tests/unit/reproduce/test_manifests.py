"""Every reproduction under examples/reproduce: its manifest loads, and every experiment of both
versions renders from its template into a valid spec (earlier runs' ids stand in as names)."""

from pathlib import Path

import pytest

from service.reproduce.manifest import Entry, load, render
from service.reproduce.runner import find
from service.spec.parse import validate_document

ROOT = Path(__file__).resolve().parents[3] / "examples" / "reproduce"
NAMES = sorted(p.parent.name for p in ROOT.glob("*/reproduction.yaml"))


def test_the_reproductions_are_there() -> None:
    assert {"flag", "pleas"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_experiment_renders_to_a_valid_spec(name: str, quick: bool) -> None:
    folder = find(name)
    manifest = load(folder)
    assert manifest.name == name
    run_ids: dict[str, str] = {}
    for stage in manifest.stages(quick):
        for entry in stage.experiments:
            validate_document(render(folder, entry, run_ids))
            if entry.key:
                run_ids[entry.key] = f"run-{entry.key}"
    paths = {p for c in manifest.claims for m in c.methods() for p in [*m, *c.within, *c.pair_by]}
    assert paths, "claims select trials by spec paths"


def test_a_template_value_left_out_is_named(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("name: x-${seed}\ntask: {kind: merge, dataset: {name: digits}}\n")
    with pytest.raises(ValueError, match=r"\$\{seed\}"):
        render(tmp_path, Entry(file="t.yaml"), {})


def test_an_unknown_reproduction_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="flag"):
        find("no-such-paper")
