"""Gateway configs that more than one test module starts from."""

# The smallest valid config: one region, one TCP service, one VM on lo.
MINIMAL = """
[gateway]
name = "gwe"
interface = "lo"

[[region]]
name = "r1"
prefixes = ["198.18.1.0/24"]

[[service]]
name = "web"
vip = "198.19.0.10"
port = 8080
protocol = "tcp"
vms = ["vm1"]

[[vm]]
name = "vm1"
port = "lo"
mac = "02:00:00:00:00:01"
"""
