"""Engines: one per artifact kind, all following `sc2quant.engines.base.Engine`."""
