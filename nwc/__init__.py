"""NWC, the Network Weaver Controller: on-demand, encrypted, bandwidth-reserved links
("weaves") between tenants' isolated virtual networks inside a provider network."""

__version__ = "0.1.0"
