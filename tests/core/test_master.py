import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mixprec import get_master, master2model, model_g2master_g
from mixprec.core.flat_group import FlatGroup

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


def _groups(shape_groups, frozen):
    """Layer groups of half parameters with the given shapes; some frozen."""
    groups, k = [], 0
    for group_shapes in shape_groups:
        module = nn.Module()
        for i, shape in enumerate(group_shapes):
            p = nn.Parameter(torch.randn(shape).half(), requires_grad=k not in frozen)
            module.register_parameter(f"p{i}", p)
            k += 1
        groups.append(module)
    return groups


group_layouts = st.lists(st.lists(shapes, max_size=4), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(layout=group_layouts, frozen=st.sets(st.integers(0, 12)), flat=st.booleans())
def test_get_master_mirrors_the_trainable_params(layout, frozen, flat):
    groups = _groups(layout, frozen)
    model_params, master_params = get_master(groups, flat_master=flat)
    assert len(model_params) == len(master_params) == len(groups)
    for module, params, masters in zip(groups, model_params, master_params):
        assert params == [p for p in module.parameters() if p.requires_grad]
        if not params:
            assert masters == []
        elif flat:
            (master,) = masters
            assert isinstance(master, nn.Parameter) and master.dtype == torch.float32
            assert master.numel() == sum(p.numel() for p in params)
            assert torch.equal(master.detach(), torch.cat([p.float().reshape(-1) for p in params]))
            assert torch.equal(master.grad, torch.zeros_like(master))
        else:
            for p, m in zip(params, masters):
                assert m.dtype == torch.float32 and m.requires_grad and m.shape == p.shape
                assert m.data_ptr() != p.data_ptr() and m.grad_fn is None
                assert torch.equal(m.detach(), p.float())


@settings(max_examples=40, deadline=None)
@given(layout=group_layouts, flat=st.booleans(), missing=st.sets(st.integers(0, 12)))
def test_grads_and_values_round_trip(layout, flat, missing):
    groups = _groups(layout, frozen=set())
    model_params, master_params = get_master(groups, flat_master=flat)
    flat_params = [p for g in model_params for p in g]
    for k, p in enumerate(flat_params):
        p.grad = None if k in missing else torch.randn(p.shape).half()
    model_g2master_g(model_params, master_params, flat_master=flat)
    for params, masters in zip(model_params, master_params):
        if flat and params:
            expected = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1)
                    for p in params
                ]
            )
            assert torch.equal(masters[0].grad, expected)
        elif not flat:
            for p, m in zip(params, masters):
                if p.grad is None:
                    assert m.grad is None
                else:
                    assert m.grad.dtype == torch.float32 and torch.equal(m.grad, p.grad.float())
    # new master values come back into the model rounded to half
    for masters in master_params:
        for m in masters:
            m.data.add_(torch.rand_like(m) * 1e-3)
    master2model(model_params, master_params, flat_master=flat)
    for params, masters in zip(model_params, master_params):
        if not params:
            continue
        values = (
            masters[0].detach() if flat else torch.cat([m.detach().reshape(-1) for m in masters])
        )
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), values.half())


def test_accumulate_adds_in_fp32():
    p = nn.Parameter(torch.zeros(2).half())
    model_params, master_params = get_master([nn.ParameterList([p])])
    p.grad = torch.tensor([60000.0, 1.0]).half()
    model_g2master_g(model_params, master_params)
    model_g2master_g(model_params, master_params, accumulate=True)
    assert master_params[0][0].grad.tolist() == [120000.0, 2.0]  # inf in half, exact in fp32


def test_tied_parameter_belongs_to_the_first_group_once():
    shared = nn.Linear(2, 2).half()
    a, b = (
        nn.Sequential(shared, nn.Linear(2, 2).half()),
        nn.Sequential(nn.Linear(2, 2).half(), shared),
    )
    model_params, master_params = get_master([a, b])
    assert sum(p is shared.weight for g in model_params for p in g) == 1
    assert any(p is shared.weight for p in model_params[0])
    assert len(model_params[1]) == len(master_params[1]) == 2


def test_empty_group_gives_empty_lists():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    for flat in (False, True):
        model_params, master_params = get_master([frozen, nn.Linear(2, 2).half()], flat)
        assert model_params[0] == [] and master_params[0] == []
        model_g2master_g(model_params, master_params, flat)
        master2model(model_params, master_params, flat)


def test_flat_master_grad_is_recreated_after_set_to_none():
    lin = nn.Linear(3, 2).half()
    model_params, master_params = get_master([lin], flat_master=True)
    master_params[0][0].grad = None
    lin.weight.grad = torch.ones(2, 3).half()
    model_g2master_g(model_params, master_params, flat_master=True)
    assert master_params[0][0].grad[:6].tolist() == [1.0] * 6
    assert master_params[0][0].grad[6:].tolist() == [0.0, 0.0]


def test_flat_master_on_several_devices_is_refused():
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="on one device"):
        get_master([nn.ParameterList([p, q])], flat_master=True)


def test_flat_group_makes_params_and_grads_views_of_buffers():
    model = nn.Sequential(nn.Linear(3, 4).half(), nn.LayerNorm(4), nn.Linear(4, 2).half())
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    (group,), (masters,) = get_master([model], flat_master=True)
    flat = FlatGroup(group, masters[0])
    assert len(flat.data) == 3  # half run, fp32 run (LayerNorm), half run
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    buffer_of = [0, 0, 1, 1, 2, 2]  # weight, bias of each layer -> its buffer
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    for p, k in zip(params, buffer_of):
        assert storage(p) == storage(flat.data[k]) and storage(p.grad) == storage(flat.grads[k])
    model(torch.randn(5, 3).half()).float().sum().backward()  # accumulates into the views
    for p, k in zip(params, buffer_of):
        assert storage(p.grad) == storage(flat.grads[k])
    assert all(g.abs().sum() > 0 for g in flat.grads)
    model.zero_grad(set_to_none=True)
    params[0].grad = torch.ones_like(params[0])
    flat.repair_grads()
    assert torch.equal(flat.grads[0][: params[0].numel()], torch.ones(params[0].numel()).half())
    assert flat.grads[0][params[0].numel() :].abs().sum() == 0


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
@pytest.mark.parametrize("copy", [master2model, model_g2master_g])
def test_another_models_masters_are_refused_naming_the_shapes_before_any_copy(copy, flat):
    ours = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)).to(torch.bfloat16)
    other = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4)).to(torch.bfloat16)
    model_params, _ = get_master([ours], flat_master=flat)
    _, other_masters = get_master([other], flat_master=flat)
    for p in ours.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in ours.parameters()]
    masters_before = [m.detach().clone() for m in other_masters[0]]
    grads_before = [None if m.grad is None else m.grad.clone() for m in other_masters[0]]
    expected = (
        r"group 0: the flat master has shape \(20,\) but the group's parameters, of shapes "
        r"\[\(3, 2\), \(3,\), \(2, 3\), \(2,\)\], hold 17 elements"
        if flat
        else r"group 0, parameter 0: the master has shape \(2, 3\) but the model parameter has "
        r"shape \(3, 2\)"
    )
    with pytest.raises(ValueError, match=expected + ": these masters were made for another"):
        copy(model_params, other_masters, flat)
    assert all(torch.equal(a, p) for a, p in zip(before, ours.parameters()))
    assert all(torch.equal(a, m) for a, m in zip(masters_before, other_masters[0]))
    for m, g in zip(other_masters[0], grads_before):
        assert (m.grad is None and g is None) or torch.equal(m.grad, g)


def test_a_master_of_another_shape_further_on_is_refused_before_the_first_is_copied():
    ours = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    other = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 5))
    model_params, _ = get_master([ours])
    _, other_masters = get_master([other])
    first = ours[0].weight.detach().clone()
    with torch.no_grad():
        other_masters[0][0].add_(1.0)  # the first pair fits: it must not be copied either
    with pytest.raises(ValueError, match=r"group 0, parameter 2: the master has shape \(5, 3\)"):
        master2model(model_params, other_masters)
    assert torch.equal(ours[0].weight, first)
