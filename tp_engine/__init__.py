"""tp_engine"""
