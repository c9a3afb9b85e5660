"""MLflow tracking and the model registry: the store (`store`), the promotion gate without MLflow
(`gate`), the served pyfunc model (`serving`) and the register stage's work (`register`)."""


def __getattr__(name: str):
    # models registered before this package was split load `ddcore.registry.DDImageModel`
    if name == "DDImageModel":
        from ddcore.registry.serving import DDImageModel

        return DDImageModel
    raise AttributeError(name)
