"""Architecture register types and boot-state builders (x86_64, aarch64)."""
