from sslc_export.runtimes.providers.base import Provider


class Cpu(Provider):
    name = "cpu"
    execution_provider = "CPUExecutionProvider"
