"""The HTTP face: the Flask app factory, the hook and feedback views, client errors as OperationOutcomes."""
