from sslc_export.runtimes.providers.base import Provider


class Cuda(Provider):
    name = "cuda"
    execution_provider = "CUDAExecutionProvider"
    device_type = "cuda"
    needs = "install onnxruntime-gpu on a machine with an NVIDIA GPU"
