"""The engine cache keeps a bounded number of SQLite engines open."""

from __future__ import annotations

from metacrm.runtime.database import Engines


def test_least_recently_used_engines_are_disposed(tmp_path):
    engines = Engines(max_engines=2)
    a = engines.get(f"sqlite:///{tmp_path / 'a.db'}")
    b = engines.get(f"sqlite:///{tmp_path / 'b.db'}")
    assert engines.get(f"sqlite:///{tmp_path / 'a.db'}") is a  # a is now the most recent
    engines.get(f"sqlite:///{tmp_path / 'c.db'}")  # evicts b
    assert engines.get(f"sqlite:///{tmp_path / 'a.db'}") is a
    assert engines.get(f"sqlite:///{tmp_path / 'b.db'}") is not b
    with b.connect() as connection:  # an evicted engine still works for its holder
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    engines.dispose()


def test_a_kept_engine_is_never_evicted(tmp_path):
    engines = Engines(max_engines=3)
    control = engines.keep(f"sqlite:///{tmp_path / 'control.db'}")
    for name in ("a", "b", "c", "d"):
        engines.get(f"sqlite:///{tmp_path / f'{name}.db'}")
    # The kept engine is the least recently used one, yet a and b went instead.
    assert engines.get(f"sqlite:///{tmp_path / 'control.db'}") is control
    c = engines.get(f"sqlite:///{tmp_path / 'c.db'}")
    engines.get(f"sqlite:///{tmp_path / 'e.db'}")  # evicts d, the oldest engine not kept
    assert engines.get(f"sqlite:///{tmp_path / 'c.db'}") is c
    assert engines.get(f"sqlite:///{tmp_path / 'control.db'}") is control
    engines.dispose()
