"""Edge models: a registered version exported to ONNX (float, or int8 by onnxruntime's dynamic
quantization), checked against the float torch model on the task's held-out test set (the
parity record), and signed with the coordinator's key like a manifest.

``artifact`` (the signed artifact manifest, writing and verifying; no torch, no onnx),
``export`` (torch.onnx with onnxscript, then onnxruntime.quantization), ``parity`` (the
evaluation set and the comparison), ``runtime`` (an onnxruntime session over verified bytes),
``build`` (the whole ``fedaiot export``). Imports ``fedaiot.errors``, ``fedaiot.tasks`` and
``fedaiot.registry``; torch, onnx and onnxruntime load only in the modules that use them.
"""
