"""Bodies nobody writes by hand: each is refused with a 4xx that names the field or the body, in
well under a second, and nothing is stored. The same table runs against PostgreSQL in
tests/integration/test_postgres.py."""

import json
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.api_harness import make_client

QUICKSTART = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text())
JSON, YAML = "application/json", "application/yaml"


def spec_with(path: str, value: object) -> dict:  # type: ignore[type-arg]
    doc = json.loads(json.dumps(QUICKSTART))
    node = doc
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return doc


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


def block_nested(depth: int) -> str:
    return "".join(f"{'  ' * i}k{i}:\n" for i in range(depth)) + f"{'  ' * depth}leaf\n"


# (case, body, content type, status, field named in the first error)
HOSTILE: list[tuple[str, str, str, int, str]] = [
    ("json nested 10,000 deep", "[" * 10_000 + "]" * 10_000, JSON, 400, "body"),
    ("json object nested 10,000 deep", '{"a":' * 10_000 + "1" + "}" * 10_000, JSON, 400, "body"),
    ("yaml flow nested 10,000 deep", "a: " + "[" * 10_000 + "]" * 10_000, YAML, 400, "body"),
    ("yaml block nested 500 deep", block_nested(500), YAML, 400, "body"),
    ("yaml alias bomb", billion_laughs(), YAML, 400, "body"),
    ("yaml alias bomb in a sweep choice",
     billion_laughs(7).replace("name: *a6", "sweep: {parameters: {optimizer.lr: {choice: *a6}}}"), YAML, 400, "body"),
    ("json integer of 5,000 digits",
     json.dumps(spec_with("train.seed", 0)).replace('"seed": 0', '"seed": ' + "9" * 5000), JSON, 400, "body"),
    ("yaml hex integer of 5,000 digits",
     yaml.safe_dump(spec_with("train.seed", 0)).replace("seed: 0", "seed: 0x" + "f" * 5000), YAML, 422, "train.seed"),
    ("Infinity in train.grad_clip",
     json.dumps(spec_with("train.grad_clip", float("inf"))), JSON, 422, "train.grad_clip"),
    ("NaN in resources_per_worker", json.dumps(spec_with("distributed.resources_per_worker", {"CPU": float("nan")})),
     JSON, 422, "distributed.resources_per_worker.CPU"),
    ("yaml .inf in optimizer.lr", yaml.safe_dump(spec_with("optimizer.lr", 0.1)).replace("lr: 0.1", "lr: .inf"),
     YAML, 422, "optimizer.lr"),
    ("NaN in the DeepSpeed fragment",
     json.dumps(spec_with("distributed.deepspeed", {"config": {"optimizer": {"params": {"eps": float("nan")}}}})),
     JSON, 422, "distributed.deepspeed.config.optimizer.params.eps"),
    ("10^400 in the DeepSpeed fragment",
     json.dumps(spec_with("distributed.deepspeed", {"config": {"train_micro_batch_size_per_gpu": 10**400}})),
     JSON, 422, "distributed.deepspeed.config.train_micro_batch_size_per_gpu"),
    ("NUL in a tag", json.dumps(spec_with("tags", {"team": "a\x00b"})), JSON, 422, "tags.team"),
    ("NUL in the description", json.dumps(spec_with("description", "x\x00")), JSON, 422, "description"),
    ("escape character in the name", json.dumps(spec_with("name", "run\x1b[31m")), JSON, 422, "name"),
]


def stored(client: TestClient) -> int:
    return len(client.get("/v1/experiments", params={"limit": 500}).json()["items"])


def check_hostile(client: TestClient) -> None:
    """Shared by the SQLite and PostgreSQL suites."""
    before = stored(client)
    for case, body, ctype, status, field in HOSTILE:
        t0 = time.monotonic()
        r = client.post("/v1/experiments", content=body, headers={"Content-Type": ctype})
        took = time.monotonic() - t0
        assert r.status_code == status, (case, r.status_code, r.text[:500])
        assert r.json()["detail"][0]["field"] == field, (case, r.json())
        assert len(r.content) < 20_000, (case, len(r.content))
        # A bound against blow-ups (an alias bomb or deep nesting costs minutes when unbounded), loose
        # enough for a loaded 2-core CI machine; each case takes milliseconds on an idle one.
        assert took < 5.0, (case, took)
    assert stored(client) == before


def test_hostile_bodies_are_refused_fast(tmp_path: Path) -> None:
    check_hostile(make_client(f"sqlite:///{tmp_path / 'h.db'}"))


def test_expanded_spec_over_the_limit_is_413(tmp_path: Path) -> None:
    """A small YAML whose aliases expand past the body limit (but within the node bound)."""
    client = make_client(f"sqlite:///{tmp_path / 'h.db'}", max_body=64 * 1024)
    words = "x" * 1000
    body = yaml.safe_dump(QUICKSTART) + f"big: &b ['{words}', '{words}', '{words}', '{words}']\n"
    body += "description: hi\ntags: {" + ", ".join(f"t{i}: v" for i in range(3)) + "}\n"
    body += "extra: [" + ", ".join(["*b"] * 40) + "]\n"
    assert len(body) < 64 * 1024
    r = client.post("/v1/experiments", content=body, headers={"Content-Type": YAML})
    assert r.status_code == 413 and "expanded" in r.json()["detail"][0]["message"]
    assert stored(client) == 0


@pytest.mark.parametrize("value", ["tab\tand newline\nare fine", "unicode: λ ✓"])
def test_ordinary_text_is_accepted(tmp_path: Path, value: str) -> None:
    client = make_client(f"sqlite:///{tmp_path / 'h.db'}")
    r = client.post("/v1/experiments", content=json.dumps(spec_with("description", value)))
    assert r.status_code == 201, r.text
