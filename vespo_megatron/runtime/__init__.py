"""Runtime: device/backend choice, megatron-core CPU compatibility, process groups, seeding."""
