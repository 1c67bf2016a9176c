"""edgerun fleet console (`edge-fleet`): see the fleet, roll models out, roll back."""
