"""specplan.hwprofiles"""
