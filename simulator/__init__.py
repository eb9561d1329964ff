"""specplan.simulator"""
