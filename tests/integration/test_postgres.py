"""The API contract and the migrations against the real PostgreSQL server."""

import threading

import pytest
import yaml

from service.db import current_revision, engine_for, head_revision, session_factory, upgrade
from service.repo import experiments as exp_repo
from service.spec import parse_spec
from tests.api_harness import make_client
from tests.unit.test_api import QUICKSTART, run_contract
from tests.unit.test_hostile_input import check_hostile

pytestmark = pytest.mark.integration


def test_migrations_reach_head_and_downgrade(postgres_url: str) -> None:
    upgrade(postgres_url)
    engine = engine_for(postgres_url)
    assert current_revision(engine) == head_revision(postgres_url)
    upgrade(postgres_url)  # idempotent
    from alembic import command

    from service.db import alembic_config

    command.downgrade(alembic_config(postgres_url), "base")
    assert current_revision(engine) is None
    upgrade(postgres_url)
    assert current_revision(engine) == head_revision(postgres_url)


def test_contract_on_postgres(postgres_url: str) -> None:
    run_contract(make_client(postgres_url))


def test_hostile_bodies_on_postgres(postgres_url: str) -> None:
    check_hostile(make_client(postgres_url))


def test_concurrent_idempotent_submissions_make_one_experiment(postgres_url: str) -> None:
    upgrade(postgres_url)
    sessions = session_factory(engine_for(postgres_url))
    doc = yaml.safe_load(QUICKSTART)
    resolved = parse_spec(QUICKSTART, "application/yaml").resolved()
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        with sessions() as s:
            exp, _ = exp_repo.create_experiment(s, spec=doc, resolved=resolved, idempotency_key="same")
            s.commit()
            ids.append(exp.id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 8
    with sessions() as s:
        assert exp_repo.count_experiments(s) == 1
