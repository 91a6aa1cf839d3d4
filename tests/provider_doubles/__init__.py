"""Local servers that speak each upstream provider's wire format strictly, for the provider tests."""
