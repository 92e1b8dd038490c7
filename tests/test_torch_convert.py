"""convert_batch_norm / export_batch_norm (docs/SPEC.md, section 14) on a torchvision-style ResNet-18 written here
(torchvision does not import beside torch 2.13, and no weights can be downloaded)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from parity import assert_close
from torch import nn

from renorm.torch import BatchRenorm, BatchRenorm1d, BatchRenorm2d, convert_batch_norm, export_batch_norm


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet (BasicBlock, layers [2, 2, 2, 2]: ResNet-18), ``width`` channels first."""

    def __init__(self, layers=(2, 2, 2, 2), width=64, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], 2)
        self.layer3 = self._make_layer(4 * width, layers[2], 2)
        self.layer4 = self._make_layer(8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def trained_resnet(dtype=torch.float64, width=16):
    """A ResNet-18 with non-trivial batch-norm statistics and affine parameters, in eval mode."""
    torch.manual_seed(0)
    model = ResNet(width=width).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32, dtype=dtype))
    return model.eval()


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_converted_resnet_infers_as_the_original(dtype, tol):
    model = trained_resnet(dtype)
    n_bn = count(model, nn.BatchNorm2d)
    assert n_bn == 20
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        y = model(x)
        conv = convert_batch_norm(copy.deepcopy(model), rmax=2.0, dmax=1.0)
        assert count(conv, nn.BatchNorm2d) == 0 and count(conv, BatchRenorm2d) == n_bn
        assert not conv.training and all(not m.training for m in conv.modules())
        r = conv.layer2[0].downsample[1]
        assert (r.rmax, r.dmax, int(r.num_batches_tracked), r.running_std.dtype) == (2.0, 1.0, 0, dtype)
        y_conv = conv(x)
        rel = float(torch.linalg.norm(y_conv - y) / torch.linalg.norm(y))
        assert rel <= tol, rel
        back = export_batch_norm(conv)
        assert count(back, BatchRenorm) == 0 and count(back, nn.BatchNorm2d) == n_bn
        rel = float(torch.linalg.norm(back(x) - y) / torch.linalg.norm(y))
        assert rel <= tol, rel
        bn, orig = back.layer3[1].bn2, model.layer3[1].bn2
        torch.testing.assert_close(bn.running_var, orig.running_var, rtol=tol, atol=0)
        assert int(bn.num_batches_tracked) == 0  # the converted model's steps (none): the step counter is copied


def test_converted_resnet_with_rmax1_dmax0_trains_as_batch_norm():
    """One training step of the converted ResNet (rmax=1, dmax=0): outputs and every gradient equal batch norm's."""
    model = trained_resnet().train()
    conv = convert_batch_norm(copy.deepcopy(model), rmax=1.0, dmax=0.0)
    assert conv.training
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    outs = []
    for m in (model, conv):
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), {k: p.grad for k, p in m.named_parameters()}))
    (y1, g1), (y2, g2) = outs
    assert_close(y2.numpy(), y1.numpy(), "float64", "value", "y")
    assert set(g1) == set(g2)
    for k in g1:
        assert_close(g2[k].numpy(), g1[k].numpy(), "float64", "grad", k)
    torch.testing.assert_close(conv.bn1.running_mean, model.bn1.running_mean, rtol=1e-12, atol=1e-14)


def test_convert_carries_options_flags_and_sync():
    seq = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4, eps=1e-3, momentum=None, affine=True),
        nn.SyncBatchNorm(4, track_running_stats=False),
        nn.BatchNorm3d(4, affine=False),
    )
    seq[1].weight.requires_grad_(False)
    out = convert_batch_norm(seq, rmax=1.5)
    assert out is seq  # in place, as SyncBatchNorm.convert_sync_batchnorm
    a, b, c = seq[1], seq[2], seq[3]
    assert type(a) is BatchRenorm1d and (a.eps, a.momentum, a.rmax, b.rmax, c.rmax) == (1e-3, None, 1.5, 1.5, 1.5)
    assert not a.weight.requires_grad and a.bias.requires_grad
    assert type(b) is BatchRenorm and b.synchronized and not b.track_running_stats and b.running_std is None
    assert not c.affine and c.weight is None
    assert isinstance(convert_batch_norm(nn.BatchNorm2d(3)), BatchRenorm2d)  # a norm at the root is returned
    with pytest.raises(ValueError, match="microbatch_size=2"):  # SyncBatchNorm pools: no micro-batches
        convert_batch_norm(nn.Sequential(nn.SyncBatchNorm(4)), microbatch_size=2)
    back = export_batch_norm(seq)
    assert type(back[1]) is nn.BatchNorm1d and type(back[2]) is nn.SyncBatchNorm and type(back[3]) is nn.BatchNorm3d


def test_conversion_errors():
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_var[1] = -1.0
    with pytest.raises(ValueError, match="'BatchNorm1d'.*negative or non-finite moving variance"):
        convert_batch_norm(bn)
    model = nn.Sequential(nn.Linear(2, 3), BatchRenorm1d(3))
    with torch.no_grad():
        model[1].running_std.fill_(1e-4)  # below sqrt(eps) = 3.2e-3
    with pytest.raises(ValueError, match="Layer '1': 3 feature"):
        export_batch_norm(model)
    with pytest.warns(UserWarning, match="exported with variance 0"):
        out = export_batch_norm(model, negative_variance="clamp")
    assert torch.equal(out[1].running_var, torch.zeros(3))
    with pytest.raises(ValueError, match="negative_variance='zero'"):
        export_batch_norm(model, negative_variance="zero")
    with pytest.raises(TypeError, match="Module 'x' is a BatchRenorm of no fixed rank"):
        export_batch_norm(nn.ModuleDict({"x": BatchRenorm(3)}))


@pytest.mark.parametrize("fn", [convert_batch_norm, export_batch_norm])
@pytest.mark.parametrize("bad", [None, 3, {"bn": nn.BatchNorm1d(3)}])
def test_converters_refuse_what_is_not_a_module(fn, bad):
    """issue 32: convert_batch_norm(None) failed with AttributeError ... 'named_children'."""
    expected = rf"^{fn.__name__}\(\) takes a torch.nn.Module as `module`, got {type(bad).__name__}\.$"
    with pytest.raises(TypeError, match=expected):
        fn(bad)


@pytest.mark.parametrize(
    "setting,message", [({"momentum": 0.0}, "`momentum` must be in"), ({"eps": 0.0}, "`eps` must be")]
)
def test_convert_errors_name_the_module(setting, message):
    """A batch norm setting that batch renorm refuses: the message names the argument and the module."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3, **setting)))
    with pytest.raises(ValueError, match=rf"^Module '1\.1' \(BatchNorm1d\): {message}"):
        convert_batch_norm(model)
    assert isinstance(model[1][1], nn.BatchNorm1d)  # nothing replaced
    with pytest.raises(ValueError, match=rf"^Module 'BatchNorm1d': {message}"):
        convert_batch_norm(nn.BatchNorm1d(3, **setting))
    with pytest.raises(ValueError, match=r"^`rmax` must be"):  # an option's error names no module: it is not one's
        convert_batch_norm(nn.Sequential(nn.BatchNorm1d(3)), rmax=0.5)


def test_exported_model_loads_without_renorm(tmp_path):
    """The exported model holds only torch modules: pickled whole, it loads where renorm cannot be imported."""
    model = convert_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model(torch.randn(4, 3, 5, 5))
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    path = tmp_path / "model.pt"
    torch.save({"model": export_batch_norm(model), "x": x, "y": model(x).detach()}, path)
    code = textwrap.dedent(f"""
        import sys, torch
        class Block:
            def find_spec(self, name, *a):
                if name == "renorm" or name.startswith("renorm."):
                    raise ImportError("renorm is blocked")
        sys.meta_path.insert(0, Block())
        d = torch.load({str(path)!r}, weights_only=False)
        torch.testing.assert_close(d["model"](d["x"]), d["y"], rtol=1e-6, atol=1e-6)
        assert "renorm" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_an_error_in_a_later_module_leaves_the_earlier_ones_unconverted():
    """A conversion that stops part-way would leave a model half batch norm, half renorm: none is replaced."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3)), nn.BatchNorm1d(3, momentum=0.0))
    with pytest.raises(ValueError, match=r"^Module '2' \(BatchNorm1d\)"):
        convert_batch_norm(model)
    assert [type(m) for m in (model[0], model[1][0], model[2])] == [nn.BatchNorm1d] * 3
    renormed = nn.Sequential(BatchRenorm1d(3), BatchRenorm1d(3))
    with torch.no_grad():
        renormed[1].running_std.fill_(1e-4)  # below sqrt(eps): no batch-norm equivalent
    with pytest.raises(ValueError, match="Layer '1'"):
        export_batch_norm(renormed)
    assert [type(m) for m in renormed] == [BatchRenorm1d, BatchRenorm1d]
