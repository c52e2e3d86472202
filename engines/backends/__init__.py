"""Built-in backends. Importing this package registers them (cheaply: heavy imports stay lazy)."""

from engines.backends import classical as classical
from engines.backends import onnxruntime_backend as onnxruntime_backend
from engines.backends import tensorrt_backend as tensorrt_backend
from engines.backends import torch_backend as torch_backend
