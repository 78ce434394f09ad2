"""The gateway's TOML configuration: what it may say (schema), how a file becomes
typed values, and what must hold across entries (validation)."""
from control.config.schema import (AgentConfig, CenterLinkConfig, Config, ConfigError, GatewayConfig, HealthConfig,
                                   HostConfig, MonitorConfig, RegionConfig, ServiceConfig, VMConfig, load_config,
                                   parse_config, parse_listen, validate)

__all__ = ["AgentConfig", "CenterLinkConfig", "Config", "ConfigError", "GatewayConfig", "HealthConfig", "HostConfig",
           "MonitorConfig", "RegionConfig", "ServiceConfig", "VMConfig", "load_config", "parse_config", "parse_listen",
           "validate"]
