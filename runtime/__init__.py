"""specplan.runtime"""
