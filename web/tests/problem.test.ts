import { describe, expect, it } from "vitest";
import { fieldId, mapFieldErrors, parseProblem } from "../src/lib/problem";

const FORM = ["adapter_name", "base_model", "dataset.train", "method.r", "method.target_modules", "training.learning_rate"];

describe("parseProblem", () => {
  it("reads a problem document", () => {
    const body = JSON.stringify({
      type: "urn:loraforge:problem:validation_failed",
      title: "Invalid request",
      status: 422,
      code: "validation_failed",
      detail: "2 problems",
      field: "method.r",
      errors: [
        { field: "method.r", message: "must be between 1 and 4096, got 0" },
        { field: "training.learning_rate", message: "must be a positive number below 10" },
      ],
    });
    const p = parseProblem(422, "application/problem+json", body);
    expect(p.code).toBe("validation_failed");
    expect(p.field).toBe("method.r");
    expect(p.errors).toHaveLength(2);
  });

  it("turns anything else into a problem that says what happened", () => {
    expect(parseProblem(502, "text/html", "<h1>Bad gateway</h1>")).toMatchObject({
      status: 502,
      code: "http_502",
      title: "Server error",
      detail: "<h1>Bad gateway</h1>",
      errors: [],
    });
    expect(parseProblem(500, "application/json", "{not json")).toMatchObject({ code: "http_500" });
    expect(parseProblem(0, null, "")).toMatchObject({ code: "network", detail: "The server could not be reached" });
  });
});

describe("mapFieldErrors", () => {
  it("puts each error next to its field, or the nearest enclosing one", () => {
    const p = parseProblem(
      422,
      "application/problem+json",
      JSON.stringify({
        status: 422,
        code: "validation_failed",
        detail: "x",
        errors: [
          { field: "method.r", message: "must be between 1 and 4096, got 0" },
          { field: "method.target_modules[1]", message: "unknown module \"x_proj\"" },
          { field: "dataset.train", message: "no such file" },
          { field: "dataset.validation_fraction", message: "must be in (0, 1)" },
          { field: "", message: "the body is not JSON" },
          { field: "Idempotency-Key", message: "must be 1-255 visible ASCII characters" },
        ],
      }),
    );
    const mapped = mapFieldErrors(p, FORM);
    expect(mapped.byField).toEqual({
      "method.r": ["must be between 1 and 4096, got 0"],
      "method.target_modules": ['unknown module "x_proj"'],
      "dataset.train": ["no such file"],
    });
    expect(mapped.general.map((e) => e.field)).toEqual(["dataset.validation_fraction", "", "Idempotency-Key"]);
  });

  it("shows a problem without field errors as one general message", () => {
    const p = parseProblem(
      409,
      "application/problem+json",
      JSON.stringify({ status: 409, code: "idempotency_key_reused", detail: "the key was used for another body" }),
    );
    expect(mapFieldErrors(p, FORM)).toEqual({
      byField: {},
      general: [{ field: "", message: "the key was used for another body" }],
    });
  });

  it("uses the problem's field when it names one of the form's", () => {
    const p = parseProblem(
      400,
      "application/problem+json",
      JSON.stringify({ status: 400, code: "malformed_body", detail: "invalid type", field: "training.learning_rate" }),
    );
    expect(mapFieldErrors(p, FORM).byField).toEqual({ "training.learning_rate": ["invalid type"] });
  });

  it("gives every field path a usable element id", () => {
    expect(fieldId("method.target_modules[1]")).toBe("f-method-target_modules-1-");
  });
});
