"""kubecash.broker"""
