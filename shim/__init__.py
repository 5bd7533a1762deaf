"""kubecash.shim"""
