"""Wire formats: the OpenAI API (`openai`), the error envelope (`errors`) and inter-service payloads (`payloads`)."""
