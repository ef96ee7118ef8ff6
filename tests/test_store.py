"""The studies' one store: content hashes, atomic writes, validated caches, JSONL logs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from linop.studies import store


def test_content_hash_is_content_not_identity():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": np.ones(3)}
    b = {"b": np.ones(3), "w": torch.arange(6.0).reshape(2, 3)}  # same content, other order
    assert store.content_hash(a) == store.content_hash(b)
    c = {"w": torch.arange(6.0).reshape(3, 2), "b": np.ones(3)}  # same bytes, other shape
    d = {"w": torch.arange(6.0).reshape(2, 3).double(), "b": np.ones(3)}  # other dtype
    e = {"w": torch.arange(6.0).reshape(2, 3), "b": np.nextafter(np.ones(3), 2)}  # one ulp
    assert len({store.content_hash(x) for x in (a, c, d, e)}) == 4
    assert store.content_hash(a, salt="v1") != store.content_hash(a, salt="v2")
    m1, m2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    m2.load_state_dict(m1.state_dict())
    assert store.content_hash(m1) == store.content_hash(m2)
    assert store.key_of({"a": 1, "b": "x"}) == store.key_of({"b": "x", "a": 1})


def test_content_hash_of_a_network_survives_its_first_computation():
    """Lazily filled memos (operators' structure, nodes' local Jacobians, the geometry) are not
    content: hashing a network before and after a back-map and a linearisation gives one digest,
    so a study's cache keys stay valid for the caller's object.  Changing a weight by one ulp
    still changes it."""
    import linop

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 3, 3)).eval().double()
    net = linop.from_torch(model, (1, 8, 8))
    before = store.content_hash(net)
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    linop.backmap(net, x, net.unit_layers[-1], mode="RM2")
    lin = linop.linearise(net, x)
    lin.operator(net.unit_layers[-1]).to_sparse()
    for n in net.nodes:
        getattr(getattr(n, "op", None), "structure", None)
    assert store.content_hash(net) == before
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = torch.nextafter(model[0].weight[0, 0, 0, 0], torch.tensor(9.0).double())
    assert store.content_hash(linop.from_torch(model, (1, 8, 8))) != before


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    p = store.atomic_write_bytes(tmp_path / "sub" / "f.bin", b"old")
    assert p.read_bytes() == b"old"

    class Boom:  # a payload whose write fails half-way
        def __bytes__(self):
            raise RuntimeError

    with pytest.raises(TypeError):
        store.atomic_write_bytes(p, Boom())
    assert p.read_bytes() == b"old" and [q.name for q in p.parent.iterdir()] == ["f.bin"]
    store.write_json(tmp_path / "j.json", {"x": float("nan"), "y": np.float32(0.5), "z": torch.tensor([1, 2])})
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": "nan", "y": 0.5, "z": [1, 2]}


def test_npz_and_pt_caches_validate_their_key(tmp_path):
    p = store.save_npz(tmp_path / "c.npz", {"a": np.arange(3)}, {"key": "k1"})
    assert store.npz_has(p, "k1", ["a"]) and not store.npz_has(p, "k2", ["a"])
    assert not store.npz_has(p, "k1", ["a", "b"])  # incomplete for this request
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert not store.npz_has(tmp_path / "bad.npz", "k1", []) and not store.npz_has(tmp_path / "no.npz", "k1", [])
    q = store.save_pt({"key": "k1", "t": torch.ones(2)}, tmp_path / "c.pt")
    assert torch.equal(store.load_pt(q, "k1")["t"], torch.ones(2))
    assert store.load_pt(q, "k2") is None and store.load_pt(tmp_path / "none.pt") is None
    (tmp_path / "torn.pt").write_bytes(q.read_bytes()[:20])
    assert store.load_pt(tmp_path / "torn.pt") is None


def test_jsonl_drops_a_torn_last_line_only(tmp_path):
    p = tmp_path / "r.jsonl"
    assert store.read_jsonl(p) == []
    store.append_jsonl(p, {"b": 1, "a": 2})
    store.append_jsonl(p, {"a": 3})
    with open(p, "a") as fh:
        fh.write('{"a": 4, "tor')
    assert store.read_jsonl(p) == [{"a": 2, "b": 1}, {"a": 3}]
    assert p.read_text() == '{"a": 2, "b": 1}\n{"a": 3}\n'  # rewritten without the torn line
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        store.read_jsonl(p)
