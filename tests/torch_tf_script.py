"""TensorFlow, then PyTorch, in one fresh interpreter (run by tests/test_torch_tf_process.py; issue 34).

``python torch_tf_script.py eager``: ``import tensorflow``, a conv2d and its gradient, then one eager
training step (forward, backward, a hand-written SGD update) of ``Conv2d`` + ``BatchRenorm2d(rmax=1,
dmax=0)``; the step must not import ``torch._dynamo`` (which imports ``triton`` where it is installed,
and ``import triton`` after TensorFlow 2.20/2.21 crashes the process: tensorflow/tensorflow#124205).

``python torch_tf_script.py compiled``: ``triton`` imported first where it is installed (what
tests/conftest.py does), then the same TensorFlow step, then ``torch.optim.SGD`` steps of the model
eagerly and under ``torch.compile`` (``aot_eager``), both of which import ``torch._dynamo``.

Prints ``torch-tf <mode> OK``; a segmentation fault shows as a negative return code to the caller.
"""

import faulthandler
import importlib.util
import sys

faulthandler.enable()
mode = sys.argv[1]
if mode == "compiled" and importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

import tensorflow as tf  # noqa: E402 (triton first, where it is installed)

x = tf.random.normal((2, 8, 8, 3))
w = tf.Variable(tf.random.normal((3, 3, 3, 4)))
with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, "SAME"))
assert tape.gradient(loss, w).shape == w.shape

import torch  # noqa: E402

from renorm.torch import BatchRenorm2d  # noqa: E402

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), BatchRenorm2d(64, rmax=1.0, dmax=0.0))
xt = torch.randn(8, 3, 16, 16)
if mode == "eager":
    model(xt).square().sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    loaded = [m for m in ("torch._dynamo", "triton") if m in sys.modules]
    assert not loaded, f"an eager training step imported {loaded}"
else:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        opt.zero_grad()
        fn(xt).square().sum().backward()
        opt.step()
    assert int(model[1].num_batches_tracked) == 2
print(f"torch-tf {mode} OK")
