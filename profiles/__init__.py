"""Device profiles as data: one TOML file per target device (see kd2edge.profiles)."""
