"""OpenVINO through the plugin package onnxruntime-ep-openvino, registered into the standard
onnxruntime at run time; it needs an Intel device to be of use."""
from __future__ import annotations

import importlib.util

import onnxruntime as ort

from sslc_export.runtimes.providers.base import Availability, Provider

PLUGIN_PACKAGE = "onnxruntime_ep_openvino"


class OpenVino(Provider):
    name = "openvino"
    execution_provider = "OpenVINOExecutionProvider"
    needs = "pip install onnxruntime-ep-openvino (plugin for the standard onnxruntime) on a machine with an Intel CPU/GPU/NPU"

    def availability(self) -> Availability:
        if self.execution_provider in ort.get_available_providers():
            return super().availability()
        if importlib.util.find_spec(PLUGIN_PACKAGE) is None:
            return Availability(False, f"plugin package not installed: {self.needs}")
        try:
            plugin = __import__(PLUGIN_PACKAGE)
            ort.register_execution_provider_library(self.execution_provider, plugin.get_library_path())
            devices = [d for d in ort.get_ep_devices() if d.ep_name == self.execution_provider]
        except Exception as exc:  # the plugin API varies between releases
            return Availability(False, f"the OpenVINO plugin could not be registered ({type(exc).__name__}: {exc})")
        if not devices:
            return Availability(False, "the OpenVINO plugin registered but found no supported device on this machine")
        return Availability(True, f"OpenVINO devices: {', '.join(d.device.type.name for d in devices)}")
