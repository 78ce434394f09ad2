"""The gateway's TOML configuration: what it may say (schema), how a file becomes
typed values and back (toml), and what must hold across entries (validate)."""
from control.config.schema import (AgentConfig, CenterLinkConfig, Config, ConfigError, GatewayConfig, HealthConfig,
                                   HostConfig, IPAddress, MetricsConfig, MonitorConfig, RegionConfig, ServiceConfig,
                                   StoreConfig, VMConfig)
from control.config.toml import load_config, parse_config
from control.config.validate import parse_listen, split_addr_port, validate

__all__ = ["AgentConfig", "CenterLinkConfig", "Config", "ConfigError", "GatewayConfig", "HealthConfig", "HostConfig",
           "IPAddress", "MetricsConfig", "MonitorConfig", "RegionConfig", "ServiceConfig", "StoreConfig", "VMConfig",
           "load_config", "parse_config", "parse_listen", "split_addr_port", "validate"]
