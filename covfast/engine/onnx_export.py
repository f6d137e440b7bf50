"""Export the slice-batch inference graph of a covfast network to ONNX.

The exported graph takes standardised slices ``image: [N, C, S, S] float32`` (the output of
:func:`covfast.nn.preprocess.to_input`, S = ``INPUT_SIZE``, with the prior as a second channel for the multi-class
network), with N dynamic, and returns probabilities ``prob: [N, K, S, S] float32``: a sigmoid for single-output
networks, a softmax over the K classes otherwise.

covfast's ops are ``torch.library`` custom ops, which ONNX (and so TensorRT's ONNX parser) does not know. The
graph is captured with ``torch.export`` and every ``covfast::`` op in it is decomposed into its pure-torch
reference from :mod:`covfast.ops.reference` before translation, so the file holds only standard ONNX operators.
Opset 17 is what TensorRT 8.6+ and 10.x parse; the exporter translates at its own minimum opset and converts
down to 17.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import covfast
from covfast.io.atomic import atomic_write
from covfast.nn.preprocess import INPUT_SIZE

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "prob"
FEATURES_NAME = "features"
# Upper bound of the dynamic batch dimension seen by torch.export; the TensorRT profile picks its own range.
_EXPORT_MAX_BATCH = 1024


class ProbabilityHead(nn.Module):
    """Wrap a covfast network so that its forward returns probabilities, the graph every engine runs.

    Args:
        model: an :class:`~covfast.nn.InfNet` (its final prediction S_3 is used) or a network returning logits
            ``[N, K, H, W]`` (:class:`~covfast.nn.UNet`, :class:`~covfast.nn.ResUNet`).
        features: also return the Inf-Net's stride-8 backbone features (:attr:`covfast.nn.InfNetOutput.features`),
            which the diagnosis stage would otherwise compute again; ignored for networks without them.
    """

    def __init__(self, model: nn.Module, features: bool = False):
        super().__init__()
        self.model = model
        self.features = features and has_features(model)

    @property
    def activation(self) -> str:
        """``"sigmoid"`` or ``"softmax"``, decided by the number of output channels of the wrapped network."""
        head = getattr(self.model, "head", None)
        last = head[-1] if isinstance(head, nn.Sequential) else head
        return "softmax" if isinstance(last, nn.Conv2d) and last.out_channels > 1 else "sigmoid"

    def forward(self, image: torch.Tensor):
        """image: [N, C, H, W] float32 standardised slices -> [N, K, H, W] float32 probabilities, and with
        ``features`` the tuple (probabilities, features [N, F, H/8, W/8] float32)."""
        out = self.model(image)
        logits = out.prediction if hasattr(out, "prediction") else out
        prob = torch.softmax(logits, dim=1) if self.activation == "softmax" else torch.sigmoid(logits)
        return (prob, out.features) if self.features else prob


def has_features(model: nn.Module) -> bool:
    """Whether ``model`` is an Inf-Net, whose output carries the backbone features the diagnosis stage uses."""
    from covfast.nn import InfNet

    return isinstance(model, InfNet)


def in_channels(model: nn.Module) -> int:
    """Input channels of a covfast network (those of its first convolution)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first.in_channels


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model``'s state dict, for models not read from a file.

    For a shipped model use the SHA-256 of its safetensors file instead (:func:`covfast.nn.sha256_file`).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notices (it translates at opset 18 and converts down to 17; the checker in
    :func:`export_onnx` verifies the result) so that ``covfast build-engine`` prints only its own summary."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _reference_decompositions(program: torch.export.ExportedProgram) -> dict:
    """``covfast::`` op overload in ``program`` -> its pure-torch reference implementation."""
    from covfast.ops import reference

    table = {}
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        namespace, _, op_name = target.name().partition("::")
        if namespace != "covfast":
            continue
        ref = getattr(reference, op_name.split(".")[0], None)
        if ref is None:
            raise NotImplementedError(f"covfast op {target.name()} has no pure-torch reference to export")
        table[target] = ref
    return table


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    model_sha256: str,
    model_name: str = "model",
    arch: str | None = None,
    config: dict | None = None,
    input_size: int = INPUT_SIZE,
    features: bool = True,
) -> dict:
    """Export ``model``'s probability graph to ONNX with a dynamic batch, check it and record provenance.

    Args:
        model: a covfast network (see :class:`ProbabilityHead`); exported on the CPU in eval mode, unchanged.
        path: destination ``.onnx`` file (written atomically; parent folders are created).
        model_sha256: SHA-256 of the weights (the safetensors file, or :func:`weights_sha256`).
        model_name: name recorded in the metadata (e.g. the weights file's stem).
        arch: architecture name, recorded when known.
        config: architecture config, recorded when known.
        input_size: square slice side of the graph input.
        features: an Inf-Net graph gets a second output ``features`` (its stride-8 backbone features, see
            :class:`ProbabilityHead`); other networks have only ``prob``.

    Returns:
        dict with ``path``, ``onnx_sha256``, ``seconds`` and the ``metadata`` written into ``metadata_props``:
        covfast_version, model_name, model_sha256, arch, config, input_name, input_shape ("N,C,S,S"),
        output_name, outputs (the graph's output names, comma-separated), activation, opset, torch_version.
    """
    import onnx

    start = time.perf_counter()
    path = Path(path)
    head = ProbabilityHead(model, features=features).to("cpu").eval()
    outputs = [OUTPUT_NAME, FEATURES_NAME] if head.features else [OUTPUT_NAME]
    channels = in_channels(model)
    example = torch.zeros(2, channels, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=_EXPORT_MAX_BATCH)
    with torch.no_grad(), _quiet_exporter():
        program = torch.export.export(head, (example,), dynamic_shapes={"image": {0: batch}})
        program = program.run_decompositions(_reference_decompositions(program))
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                         input_names=[INPUT_NAME], output_names=outputs, external_data=False)
    proto = onnx_program.model_proto
    metadata = {
        "covfast_version": covfast.__version__,
        "model_name": model_name,
        "model_sha256": model_sha256,
        "arch": arch or type(model).__name__.lower(),
        "config": json.dumps(config or {}, sort_keys=True),
        "input_name": INPUT_NAME,
        "input_shape": f"N,{channels},{input_size},{input_size}",
        "output_name": OUTPUT_NAME,
        "outputs": ",".join(outputs),
        "activation": head.activation,
        "opset": str(OPSET),
        "torch_version": torch.__version__,
    }
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    foreign = sorted({node.domain for node in proto.graph.node if node.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"exported graph uses non-standard ONNX domains {foreign}; TensorRT cannot parse it")
    data = proto.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: file.write(data))  # a unique temporary name: workers may export at once
    return {"path": str(path), "onnx_sha256": hashlib.sha256(data).hexdigest(),
            "seconds": time.perf_counter() - start, "metadata": metadata}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (the weights are not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}
