"""The ground floor: errors, deployments, the device table, tracing, the measurement protocol and
the cache. Nothing here imports TVM or any other omnic room."""
