module qoqopt/tests/ollama_template

go 1.22
