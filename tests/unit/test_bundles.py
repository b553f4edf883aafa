"""Code bundles: packing a folder (its .gitignore applied), the checks before storing, the store,
and the upload endpoint."""

import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

from service.bundles import BundleError, BundleStore, check_bundle, pack
from tests.api_harness import make_client


def make_zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def names(data: bytes) -> set[str]:
    return set(zipfile.ZipFile(io.BytesIO(data)).namelist())


def test_pack_leaves_out_what_gitignore_says(tmp_path: Path) -> None:
    (tmp_path / "mylab" / "data").mkdir(parents=True)
    (tmp_path / "mylab" / "__init__.py").write_text("")
    (tmp_path / "mylab" / "task.py").write_text("def build(): ...\n")
    (tmp_path / "mylab" / "data" / "big.bin").write_bytes(b"x" * 10)
    (tmp_path / "mylab" / "data" / "keep.txt").write_text("k")
    (tmp_path / "mylab" / ".gitignore").write_text("data/*.bin\n")
    (tmp_path / ".gitignore").write_text("*.log\nruns/\n")
    (tmp_path / "train.log").write_text("")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.txt").write_text("")
    (tmp_path / "mylab" / "__pycache__").mkdir()
    (tmp_path / "mylab" / "__pycache__" / "task.cpython-311.pyc").write_bytes(b"")
    os.symlink("task.py", tmp_path / "mylab" / "alias.py")
    data = pack(tmp_path)
    assert names(data) == {".gitignore", "mylab/__init__.py", "mylab/task.py", "mylab/.gitignore",
                           "mylab/data/keep.txt", "mylab/alias.py"}
    info = check_bundle(data, 2**20)  # a link inside the folder is fine
    assert info.hash == hashlib.sha256(data).hexdigest() and info.files == 6
    link = zipfile.ZipFile(io.BytesIO(data)).getinfo("mylab/alias.py")
    assert stat.S_ISLNK(link.external_attr >> 16)


@pytest.mark.parametrize(("entries", "links", "entry", "message"), [
    ({"../evil.py": b""}, None, "../evil.py", "'..'"),
    ({"pkg/../../evil.py": b""}, None, "pkg/../../evil.py", "'..'"),
    ({"/etc/evil.py": b""}, None, "/etc/evil.py", "absolute"),
    ({"pkg/a.py": b""}, {"pkg/out": "../../etc/passwd"}, "pkg/out", "outside"),
    ({"pkg/a.py": b""}, {"pkg/abs": "/etc/passwd"}, "pkg/abs", "outside"),
    ({"workers/__init__.py": b""}, None, "workers", "shadow Orchestra's own"),
    ({"service.py": b""}, None, "service", "shadow Orchestra's own"),
    ({"migrations/env.py": b""}, None, "migrations", "shadow Orchestra's own"),
])
def test_check_refuses_escapes_and_clashes(entries: dict[str, bytes], links: dict[str, str] | None, entry: str,
                                           message: str) -> None:
    with pytest.raises(BundleError) as err:
        check_bundle(make_zip(entries, links), 2**20)
    assert err.value.entry == entry and message in str(err.value) and err.value.status_code == 422


def test_check_refuses_size_packed_and_unpacked() -> None:
    with pytest.raises(BundleError) as err:
        check_bundle(make_zip({"a.bin": os.urandom(5000)}), 4096)
    assert err.value.status_code == 413
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * 10_000_000)  # 10 MB of zeros pack to ~10 KB
    assert len(bomb.getvalue()) < 4096 * 8
    with pytest.raises(BundleError) as err:
        check_bundle(bomb.getvalue(), 1_000_000)
    assert err.value.status_code == 413 and err.value.entry == "zeros.bin"
    with pytest.raises(BundleError, match="not a zip"):
        check_bundle(b"hello", 4096)


def test_store_is_content_addressed(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "b", 2**20)
    data = make_zip({"mylab/__init__.py": b"x = 1\n"})
    first, again = store.put(data), store.put(data)
    assert first == again and store.exists(first.hash)
    assert store.path(first.hash).read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [f"{first.hash}.zip"]
    assert not store.exists("0" * 64) and not store.exists("../../etc")


def test_upload_endpoint(tmp_path: Path) -> None:
    client = make_client(f"sqlite:///{tmp_path / 'a.db'}", home=tmp_path, max_body=4096, max_bundle=2**20)
    data = make_zip({"mylab/__init__.py": b"", "mylab/weights.bin": os.urandom(200_000)})
    assert len(data) > 4096  # over the spec's body limit, under the bundle limit
    r = client.post("/v1/bundles", content=data, headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    digest = r.json()["hash"]
    assert r.json() == {"hash": hashlib.sha256(data).hexdigest(), "size": len(data), "files": 2}
    assert client.get(f"/v1/bundles/{digest}").json()["files"] == 2
    assert client.get(f"/v1/bundles/{'0' * 64}").status_code == 404
    bad = client.post("/v1/bundles", content=make_zip({"../x.py": b""}))
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "../x.py"
    big = client.post("/v1/bundles", content=os.urandom(2**20 + 10))
    assert big.status_code == 413
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == [f"{digest}.zip"]  # nothing else stored


CUSTOM = {"name": "mine", "task": {"kind": "custom", "entrypoint": "mylab.task:build", "params": {"width": 8}},
          "train": {"max_steps": 10, "batch_size": 8}, "optimizer": {"name": "adamw", "lr": 0.01}}
COMMAND = {"name": "script", "task": {"kind": "command", "command": "python train.py --lr {lr}", "params": {"lr": 0.5}},
           "distributed": {"resources_per_worker": {"CPU": 2, "GPU": 0}}, "code": {"requirements": ["tqdm>=4"]}}


def test_a_spec_names_an_uploaded_bundle_and_the_job_gets_it(tmp_path: Path) -> None:
    """Submission refuses a bundle the store does not have (nothing stored); the scheduler hands
    the stored zip to Ray as the job's working directory; a command is the job's entrypoint itself,
    with the run's MLflow run in its environment and the resources it reserves."""
    from service.scheduler import Scheduler
    from tests.fakes import MemoryLauncher, MemoryTracker

    launcher, tracker = MemoryLauncher(), MemoryTracker()
    client = make_client(f"sqlite:///{tmp_path / 'a.db'}", home=tmp_path, launcher=launcher, tracker=tracker)
    data = make_zip({"mylab/__init__.py": b"", "mylab/task.py": b"def build(width): ...\n", "train.py": b""})
    digest = hashlib.sha256(data).hexdigest()
    missing = client.post("/v1/experiments", json={**CUSTOM, "code": {"bundle": digest}})
    assert missing.status_code == 422 and missing.json()["detail"][0]["field"] == "code.bundle"
    assert client.get("/v1/experiments").json()["items"] == []
    assert client.post("/v1/bundles", content=data).json()["hash"] == digest
    custom = client.post("/v1/experiments", json={**CUSTOM, "code": {"bundle": digest}}).json()
    script = client.post("/v1/experiments", json={**COMMAND, "code": {**COMMAND["code"], "bundle": digest}}).json()

    state = client.app.state.orchestra  # type: ignore[attr-defined]
    sched = Scheduler(state.sessions, launcher, tracker, max_concurrent=4, storage_path=str(tmp_path),
                      bundles=state.bundles)
    assert sched.tick() == 2
    zip_path = str(tmp_path / "bundles" / f"{digest}.zip")
    train_call = launcher.calls[f"orchestra-{custom['runs'][0]['id']}"]
    assert train_call["working_dir"] == zip_path and "-m workers.entrypoint" in train_call["entrypoint"]
    assert train_call["num_cpus"] == 0 and train_call["pip"] is None
    run = script["runs"][0]["id"]
    call = launcher.calls[f"orchestra-{run}"]
    assert call["entrypoint"].endswith('"$PATH"; python train.py --lr 0.5') and call["working_dir"] == zip_path
    assert call["env"]["MLFLOW_RUN_ID"] == tracker.runs[run] and call["pip"] == ["tqdm>=4"]
    assert (call["num_cpus"], call["num_gpus"]) == (2.0, 0.0)


def test_a_bundle_gone_from_the_store_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    from service.scheduler import Scheduler
    from tests.fakes import MemoryLauncher, MemoryTracker

    launcher, tracker = MemoryLauncher(), MemoryTracker()
    client = make_client(f"sqlite:///{tmp_path / 'a.db'}", home=tmp_path, launcher=launcher, tracker=tracker)
    digest = client.post("/v1/bundles", content=make_zip({"mylab/__init__.py": b""})).json()["hash"]
    exp = client.post("/v1/experiments", json={**CUSTOM, "code": {"bundle": digest}}).json()
    (tmp_path / "bundles" / f"{digest}.zip").unlink()
    state = client.app.state.orchestra  # type: ignore[attr-defined]
    sched = Scheduler(state.sessions, launcher, tracker, max_concurrent=4, storage_path=str(tmp_path),
                      bundles=state.bundles, max_attempts=1)
    sched.tick()
    run = client.get(f"/v1/experiments/{exp['id']}").json()["runs"][0]
    assert run["status"] == "failed" and "not in the bundle store" in run["error"]
