from sslc_export.runtimes.providers.base import Provider


class TensorRt(Provider):
    """fp16 plus 2:4 structured sparsity: the path on which `--format nm` weights run on
    Ampere-or-newer sparse tensor cores."""

    name = "tensorrt"
    execution_provider = "TensorrtExecutionProvider"
    device_type = "cuda"
    needs = "install onnxruntime-gpu and TensorRT on a machine with an NVIDIA GPU"

    def provider_options(self) -> dict:
        return {"trt_fp16_enable": True, "trt_sparsity_enable": True}
