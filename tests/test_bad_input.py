"""Every kind of bad input is refused with a ValueError/TypeError whose message says what was expected."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import relaxedconv as rc
from relaxedconv.kernel_net import SirenKernelNet


@pytest.fixture
def lift():
    torch.manual_seed(0)
    return rc.LiftingConv(3, 2, 3, 4, hidden_channels=8)


@pytest.fixture
def group():
    torch.manual_seed(0)
    return rc.GroupConv(2, 3, 3, 4, hidden_channels=8)


# ---- the input tensor ---------------------------------------------------------------------------
def test_good_inputs_pass(lift, group):
    """The baseline the error tests perturb: these shapes are accepted."""
    assert lift(torch.randn(2, 3, 7, 9)).shape == (2, 8, 7, 9)
    assert group(torch.randn(2, 8, 7, 9)).shape == (2, 12, 7, 9)


@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 3, 7), (1, 2, 3, 7, 9), (63,)])
def test_wrong_ndim_lifting(lift, shape):
    with pytest.raises(ValueError, match=r"expected a 4-d input \[B, 3, H, W\] \(an image with 3 channels\)"):
        lift(torch.randn(shape))


def test_wrong_ndim_group(group):
    # a [B, C, N, H, W] view instead of the flattened [B, C*N, H, W]
    with pytest.raises(ValueError, match=r"expected a 4-d input \[B, 2\*4 = 8, H, W\] \(channel index c\*N \+ n\)"):
        group(torch.randn(2, 2, 4, 7, 9))


@pytest.mark.parametrize("channels", [1, 4, 12])
def test_wrong_channel_count_lifting(lift, channels):
    with pytest.raises(ValueError, match=rf"expected \[B, 3, H, W\].*got {channels} channels"):
        lift(torch.randn(2, channels, 7, 9))


def test_wrong_channel_count_group_multiple_of_n(group):
    # 12 = 3 channels x 4 rotations: right N, wrong C
    with pytest.raises(ValueError, match=r"expected \[B, 2\*4 = 8, H, W\].*got 12 channels \(3 channels x 4 rotations\?\)"):
        group(torch.randn(2, 12, 7, 9))


def test_channels_not_a_multiple_of_the_group_order(group):
    with pytest.raises(ValueError, match=r"got 6 channels; 6 is not a multiple of the group order 4: wrong rotation count\?"):
        group(torch.randn(2, 6, 7, 9))


@pytest.mark.parametrize("other_n, hint", [(3, r"6 is not a multiple of the group order 4"), (8, r"16 channels \(4 channels x 4 rotations\?\)")])
def test_feature_map_built_for_another_group_order(group, other_n, hint):
    """The output of a lifting layer with N = 3 or 8 fed to a group conv with N = 4."""
    torch.manual_seed(1)
    other = rc.LiftingConv(1, 2, 3, other_n, hidden_channels=8)
    with torch.no_grad():
        fmap = other(torch.randn(2, 1, 7, 9))
    with pytest.raises(ValueError, match=r"expected \[B, 2\*4 = 8, H, W\]") as info:
        group(fmap)
    assert info.match(hint)


def test_pointwise_wrong_rotation_count():
    pw = rc.PointwiseGroupConv(3, 2, 8, hidden_channels=8)
    with pytest.raises(ValueError, match=r"expected \[B, 3\*8 = 24, H, W\].*got 12 channels"):
        pw(torch.randn(2, 12, 5, 5))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_dtype_input(lift, dtype):
    x = torch.zeros(2, 3, 7, 9, dtype=dtype)
    with pytest.raises(TypeError, match=rf"expected a floating-point input .*got {dtype}; convert it with x.float\(\)"):
        lift(x)


def test_not_a_tensor(lift):
    with pytest.raises(TypeError, match=r"expected a torch.Tensor, got ndarray"):
        lift(torch.randn(2, 3, 7, 9).numpy())


def test_input_on_another_device_than_the_layer(lift):
    x = torch.empty(2, 3, 7, 9, device="meta")
    with pytest.raises(ValueError, match=r"input is on meta but the layer's parameters are on cpu; move one of them"):
        lift(x)


def test_layer_on_another_device_than_the_input(group):
    layer = copy.deepcopy(group).to("meta")
    with pytest.raises(ValueError, match=r"input is on cpu but the layer's parameters are on meta"):
        layer(torch.randn(2, 8, 7, 9))


@pytest.mark.parametrize("hw, padding", [((2, 9), "valid"), ((7, 2), "valid"), ((1, 1), 0)])
def test_input_smaller_than_the_window(hw, padding):
    layer = rc.LiftingConv(1, 1, 3, 1, padding=padding, hidden_channels=8)
    with pytest.raises(ValueError, match=r"smaller than the 3x3 needed"):
        layer(torch.randn(1, 1, *hw))


# ---- constructor arguments -----------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4, 0, -1])
def test_even_or_non_positive_kernel_size(k):
    with pytest.raises(ValueError, match=rf"kernel_size must be a positive odd number .*got {k}"):
        rc.GroupConv(2, 2, k, 4)


@pytest.mark.parametrize("k, exc, msg", [((3, 5), ValueError, r"one odd int \(square kernels\)"), (3.0, TypeError, r"kernel_size must be an int, got float"), (True, TypeError, r"kernel_size must be an int, got bool")])
def test_bad_kernel_size_types(k, exc, msg):
    with pytest.raises(exc, match=msg):
        rc.LiftingConv(2, 2, k, 4)


def test_square_kernel_tuple_is_accepted():
    assert rc.LiftingConv(2, 2, (3, 3), 4, hidden_channels=8).kernel_size == 3


@pytest.mark.parametrize("padding", ["full", "SAME", -1, 1.5, True, None])
def test_bad_padding(padding):
    with pytest.raises(ValueError, match=r"padding must be 'same', 'valid' or a non-negative int, got"):
        rc.LiftingConv(2, 2, 3, 4, padding=padding)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(in_channels=0), ValueError, r"in_channels must be >= 1, got 0"),
        (dict(out_channels=-2), ValueError, r"out_channels must be >= 1, got -2"),
        (dict(group_order=0), ValueError, r"group_order must be >= 1, got 0"),
        (dict(group_order=4.0), TypeError, r"group_order must be an int, got float"),
        (dict(in_channels="3"), TypeError, r"in_channels must be an int, got str"),
        (dict(kernel_depth=1), ValueError, r"kernel net depth must be >= 2"),
        (dict(hidden_channels=0), ValueError, r"hidden_channels must be >= 1, got 0"),
    ],
)
def test_bad_layer_arguments(kwargs, exc, msg):
    args = dict(in_channels=2, out_channels=2, kernel_size=3, group_order=4)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        rc.GroupConv(**args)


@pytest.mark.parametrize("name", ["omega_rel", "omega_rot", "omega_pos"])
@pytest.mark.parametrize("value, exc, msg", [
    (-1.0, ValueError, r"must be >= 0, got -1.0: a frequency's sign only mirrors the coordinates it scales \(pass 1\)"),
    (float("nan"), ValueError, r"must be a finite number >= 0, got nan"),
    (float("inf"), ValueError, r"must be a finite number >= 0, got inf"),
    ("2", TypeError, r"must be a number, got str"),
    (None, TypeError, r"must be a number, got NoneType"),
])
def test_bad_omega(name, value, exc, msg):
    """Refused in the constructor, whether or not the layer uses that frequency."""
    relax = dict(rotation_nonstationary=True, translation_nonstationary=True)
    with pytest.raises(exc, match=rf"{name} {msg}"):
        rc.GroupConv(2, 2, 3, 4, **relax, **{name: value})


@pytest.mark.parametrize("name, flag", [("omega_rot", "rotation_nonstationary"), ("omega_pos", "translation_nonstationary")])
def test_omega_without_its_nonstationarity_warns(name, flag):
    with pytest.warns(UserWarning, match=rf"LiftingConv: {name}=1.5 has no effect because {flag}=False .*pass {flag}=True") as record:
        layer = rc.LiftingConv(2, 2, 3, 4, hidden_channels=8, **{name: 1.5})
    assert record[0].filename == __file__  # points at the line that built the layer
    with pytest.warns(UserWarning, match=rf"PointwiseGroupConv: {name}=1.5") as record:
        rc.PointwiseGroupConv(2, 2, 4, hidden_channels=8, **{name: 1.5})
    assert record[0].filename == __file__
    assert name.split("_")[1] not in layer.omegas()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc.LiftingConv(2, 2, 3, 4, hidden_channels=8, **{name: 1.5, flag: True})  # used: no warning
        rc.LiftingConv(2, 2, 3, 4, hidden_channels=8, **{name: 0.0})  # the default: no warning


def test_numeric_omega_types_are_accepted():
    import numpy as np

    layer = rc.GroupConv(2, 2, 3, 4, rotation_nonstationary=True, omega_rot=np.float32(0.5), omega_rel=torch.tensor(3.0), hidden_channels=8)
    assert layer.omegas() == {"rel": 3.0, "rot": 0.5}


@pytest.mark.parametrize("cls, args", [(rc.LiftingConv, (2, 3, 3, 4)), (rc.GroupConv, (2, 3, 3, 4)), (rc.PointwiseGroupConv, (2, 3, 4))])
def test_conv2d_options_of_a_swapped_in_layer(cls, args):
    """Code written for nn.Conv2d passes stride=1, dilation=1, groups=1, padding_mode='zeros',
    device=, dtype=: each was a TypeError naming the private base class. The no-op values and
    device/dtype are accepted; the others are refused with what to do instead."""
    layer = cls(*args, hidden_channels=4, stride=1, dilation=(1, 1), groups=1, padding_mode="zeros", dtype=torch.float64, device="cpu")
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    torch.manual_seed(0)
    plain = cls(*args, hidden_channels=4)
    torch.manual_seed(0)
    assert torch.equal(cls(*args, hidden_channels=4, dtype=torch.float64).kernel_net.out.weight, plain.kernel_net.out.weight.double())
    for kw, msg in [(dict(stride=2), r"stride=2 is not supported: .* pooling layer"),
                    (dict(dilation=(2, 2)), r"dilation=\(2, 2\) is not supported: .* larger kernel_size"),
                    (dict(groups=2), r"groups=2 is not supported"),
                    (dict(padding_mode="circular"), r"padding_mode='circular' is not supported: only zero padding")]:
        with pytest.raises(ValueError, match=rf"{cls.__name__}: {msg}"):
            cls(*args, **kw)
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(\) got an unexpected keyword argument 'strides'"):
        cls(*args, strides=1)


def test_pointwise_refuses_window_arguments():
    for banned in ("kernel_size", "padding"):
        with pytest.raises(TypeError, match=rf"fixed 1x1 window; do not pass {banned}"):
            rc.PointwiseGroupConv(2, 2, 4, **{banned: 3})


def test_unknown_coordinate_group():
    with pytest.raises(ValueError, match=r"unknown coordinate groups \['abs_scale'\]; expected a subset of"):
        SirenKernelNet(["rel_pos", "abs_scale"], 2, 2)


@pytest.mark.parametrize("args", [(0, 2), (2, 0), (2.5, 2), (2, -1)])
def test_kernel_net_channel_counts_must_be_positive_integers(args):
    with pytest.raises(ValueError, match=r"SirenKernelNet (out|in)_channels must be an integer >= 1"):
        SirenKernelNet(["rel_pos"], *args)


# ---- backends --------------------------------------------------------------------------------------
def test_unknown_backend_in_constructor():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'materialize', 'expand_conv', 'factored_torch', 'triton'\), got 'cudnn'"):
        rc.GroupConv(2, 2, 3, 4, backend="cudnn")


def test_unknown_backend_per_call(group):
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        group(torch.randn(2, 8, 7, 9), backend="fast")


@pytest.mark.parametrize("where", ["constructor", "call"])
def test_expand_conv_refuses_translation_nonstationary(where):
    layer = rc.GroupConv(
        2, 2, 3, 4, translation_nonstationary=True, hidden_channels=8,
        backend="expand_conv" if where == "constructor" else "auto",
    )
    x = torch.randn(2, 8, 7, 9)
    with pytest.raises(ValueError, match=r"backend='expand_conv' cannot run a translation non-stationary .*Use backend='auto', 'factored_torch'"):
        layer(x, backend="expand_conv") if where == "call" else layer(x)
    # the other backends run it
    assert layer(x, backend="factored_torch").shape == (2, 8, 7, 9)


def test_kernel_bank_refuses_a_per_position_kernel():
    from relaxedconv.reference import expand_kernel_bank

    layer = rc.LiftingConv(2, 2, 3, 4, translation_nonstationary=True, hidden_channels=8)
    kernel = layer.full_kernel((5, 5))
    assert kernel.dim() == 5
    with pytest.raises(ValueError, match=r"expand_conv needs a translation-stationary kernel \[N, J, C_out, C_in\]"):
        expand_kernel_bank(kernel, layer.geometry)


# ---- pooling and diagnostics ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, msg", [(dict(over="channels"), r"over must be 'all', 'rotation' or 'space', got 'channels'"), (dict(reduce="sum"), r"reduce must be 'max' or 'mean', got 'sum'"), (dict(group_order=0), r"group_order must be >= 1")])
def test_invariant_pool_bad_arguments(kwargs, msg):
    args = dict(group_order=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        rc.InvariantPool(**args)


@pytest.mark.parametrize("shape", [(2, 6, 5, 5), (2, 8, 5), (8, 5, 5)])
def test_invariant_pool_bad_input(shape):
    with pytest.raises(ValueError, match=r"InvariantPool: expected \[B, C\*4, H, W\] \(channel index c\*N \+ n\), got shape"):
        rc.InvariantPool(4)(torch.randn(shape))


def test_invariant_pool_refuses_what_it_cannot_pool():
    """A list raised AttributeError ('list' object has no attribute 'dim'), an int map under
    reduce='mean' torch's 'could not infer output dtype'; max of an int map still works."""
    with pytest.raises(TypeError, match=r"InvariantPool: expected a torch.Tensor, got list"):
        rc.InvariantPool(4)([1, 2])
    ints = torch.arange(16).reshape(1, 4, 2, 2)
    with pytest.raises(TypeError, match=r"InvariantPool: reduce='mean' needs a floating-point input, got torch.int64"):
        rc.InvariantPool(4, reduce="mean")(ints)
    assert rc.InvariantPool(4)(ints).tolist() == [[15]]


def test_layer_export_refuses_a_bad_form_or_size_even_when_stationary():
    """A stationary layer ignored form='x' and input_size='abc' and exported anyway."""
    layer = rc.GroupConv(2, 2, 3, 4, hidden_channels=8)
    with pytest.raises(ValueError, match=r"form must be one of \('auto', 'bank', 'factored'\), got 'x'"):
        layer.export(form="x")
    with pytest.raises(ValueError, match=r"input_size must be H, \(H, W\) or \(C, H, W\)"):
        layer.export("abc")
    assert isinstance(layer.export(8), torch.nn.Conv2d)


def test_rotation_not_in_the_group():
    from relaxedconv.equivariance import rotate_feature_map

    with pytest.raises(ValueError, match=r"1 quarter turn\(s\) is not an element of C_3"):
        rotate_feature_map(torch.randn(1, 6, 5, 5), 1, 3)


def test_equivariance_error_on_too_small_a_map(group):
    with pytest.raises(ValueError, match=r"too small to compare a shift of .* use a larger input"):
        rc.equivariance_error(group, torch.randn(1, 8, 5, 5), in_rotations=4, out_rotations=4, margin=2)


@pytest.mark.parametrize("backend", ["materialize", "expand_conv", "factored_torch"])
def test_relaxed_conv_refuses_factors_of_two_dtypes(backend):
    """z in fp32 with w_ext in fp64 ended in matmul's 'expected m1 and m2 to have the same dtype'
    (materialize, expand_conv); under autocast the products cast them and it runs."""
    layer = rc.GroupConv(2, 3, 3, 4, hidden_channels=4)
    x = torch.randn(1, 8, 5, 5)
    z, w_ext = layer.factored_kernel((5, 5))
    with pytest.raises(TypeError, match=r"relaxed_conv: z and w_ext must have one dtype, got torch.float32 and torch.float64"):
        rc.relaxed_conv(x, z, w_ext.double(), layer.bias, layer.geometry, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rc.relaxed_conv(x, z.bfloat16(), w_ext, layer.bias, layer.geometry, backend=backend).shape == (1, 12, 5, 5)
