"""What engine and trainer processes share: bucket layout, dtype names, IPC descriptors, checksum
manifests and the process-group helper. Imports only torch and the standard library, so a trainer
(`hotswap.trainer`) and the engine agree on the wire without either importing the other."""
