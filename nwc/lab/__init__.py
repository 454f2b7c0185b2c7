"""Emulation: network namespaces, private OVS and charon instances, and the Mininet lab.
Everything here creates resources under a caller-chosen unique prefix and removes exactly
those, by name or pid; nothing kills by process name or runs Mininet's global cleanup."""
