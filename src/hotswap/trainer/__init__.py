"""What a training loop imports to push weights into running hotswap (or SGLang-compatible) engines.

```
from hotswap.trainer import DistributedWeightPusher, HttpEngineClient, verify_engine_weights

engines = [HttpEngineClient("http://rollout-0:30000"), HttpEngineClient("http://rollout-1:30000")]
pusher = DistributedWeightPusher(engines, master_address="10.0.0.5", master_port=29600)
pusher.connect()
for step in range(num_steps):
    train_step(model)
    pusher.push(model.state_dict(), weight_version=f"step-{step}")   # atomic on every engine
assert all(r.ok for r in verify_engines(engines, model.state_dict(), dtype="auto"))   # per engine, names tensors
pusher.close()
```

Transports: `DistributedWeightPusher` (torch.distributed broadcast; NCCL or gloo), `IPCWeightPusher` (CUDA IPC
or shared-memory handles, same host), `DiskWeightPusher` (a sharded HF checkpoint on a shared filesystem).
Engines: an in-process `hotswap.Engine`, or `HttpEngineClient(base_url, api_key=None)`; both are `EngineHandle`s.

This package never imports the engine (no transformers, no model code); it shares only `hotswap.wire` with it,
so trainer processes stay light.
"""

from hotswap.trainer.checks import EngineWeightsReport, verify_engine_weights, verify_engines
from hotswap.trainer.client import EngineConnectionError, EngineHandle, EngineResult, HttpEngineClient, validate_base_url
from hotswap.trainer.disk import DiskWeightPusher, save_hf_checkpoint
from hotswap.trainer.distributed import DistributedWeightPusher, free_port
from hotswap.trainer.ipc import IPCWeightPusher
from hotswap.trainer.push import PushResult, WeightPusher, WeightPushError
from hotswap.trainer.routing import decode_routed_experts
from hotswap.wire.buckets import BucketMetadata, flatten_bucket, iter_buckets, iter_named_tensors
from hotswap.wire.checksum import checksum_manifest, state_dict_manifest

__all__ = [
    "BucketMetadata", "DiskWeightPusher", "EngineWeightsReport", "DistributedWeightPusher", "EngineConnectionError", "EngineHandle", "EngineResult",
    "HttpEngineClient", "IPCWeightPusher", "PushResult", "WeightPushError", "WeightPusher", "checksum_manifest", "decode_routed_experts",
    "flatten_bucket", "free_port", "iter_buckets", "iter_named_tensors", "save_hf_checkpoint", "state_dict_manifest",
    "validate_base_url", "verify_engine_weights", "verify_engines",
]
