"""The console: a small FastAPI app that receives the agents' data and shows it."""
