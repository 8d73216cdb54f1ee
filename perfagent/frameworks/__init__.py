"""One adapter per framework family; nothing downstream knows which framework ran."""
