"""Trainer adapters: exact at init, equal to the merged ΔW, only ΔR trainable."""

import torch
from torch import nn

from qrlora.qr import canonical_basis, delta_weight
from trainer.network import AdapterNetwork


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 10), nn.GELU(), nn.Linear(10, 6))


def targets(m):
    return {"a": m[0], "b": m[2], "c": m[4]}


def test_qrlora_at_init_is_identity_and_only_delta_r_trains():
    m = model()
    x = torch.randn(5, 12)
    before = m(x)
    q = {n: canonical_basis(l.weight, 4) for n, l in targets(m).items()}
    net = AdapterNetwork.qrlora(targets(m), q, alpha=4, mask="triu")
    net.apply()
    assert torch.equal(m(x), before)
    params = dict(net.named_parameters())
    assert sorted(params) == ["adapters.0.delta_r", "adapters.1.delta_r", "adapters.2.delta_r"]
    assert net.parameter_count() == 4 * (12 + 16 + 10)
    assert not any("q" == k.split(".")[-1] for k in net.state_dict())  # Q is never saved with the adapter


def test_forward_equals_merged_delta_w_and_remove_restores():
    m = model()
    x = torch.randn(5, 12)
    before = m(x)
    q = {n: canonical_basis(l.weight, 4) for n, l in targets(m).items()}
    net = AdapterNetwork.qrlora(targets(m), q, alpha=2, mask="triu")
    with torch.no_grad():
        for a in net.adapters:
            a.delta_r.normal_()
    net.apply()
    adapted = m(x)
    merged = model()
    with torch.no_grad():
        for (name, layer), adapter in zip(targets(merged).items(), net.adapters):
            layer.weight += delta_weight(q[name], adapter.delta_r, 2 / 4, "triu")
    assert torch.allclose(adapted, merged(x), atol=1e-5)
    net.set_multiplier(0.0)
    assert torch.allclose(m(x), before, atol=1e-6)
    net.set_multiplier(1.0)
    net.remove()
    assert torch.equal(m(x), before)


def test_masked_entries_get_no_gradient():
    m = model()
    q = {n: canonical_basis(l.weight, 4) for n, l in targets(m).items()}
    net = AdapterNetwork.qrlora(targets(m), q, alpha=4, mask="triu")
    net.apply()
    m(torch.randn(3, 12)).square().sum().backward()
    for a in net.adapters:
        assert a.delta_r.grad is not None and a.delta_r.grad.abs().sum() > 0
        assert torch.count_nonzero(a.delta_r.grad.tril(-1)) == 0


def test_lora_baseline_identity_at_init_and_state_round_trip():
    m = model()
    x = torch.randn(5, 12)
    before = m(x)
    net = AdapterNetwork.lora(targets(m), rank=4, alpha=4)
    net.apply()
    assert torch.equal(m(x), before)
    assert net.parameter_count() == 4 * (12 + 16) + 4 * (16 + 10) + 4 * (10 + 6)
    with torch.no_grad():
        for a in net.adapters:
            a.up.normal_()
    state = net.adapter_state()
    other = AdapterNetwork.lora(targets(model()), rank=4, alpha=4)
    other.load_adapter_state(state)
    assert all(torch.equal(a.up, b.up) and torch.equal(a.down, b.down) for a, b in zip(net.adapters, other.adapters))
