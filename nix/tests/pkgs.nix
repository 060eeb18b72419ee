# A stand-in for the few nixpkgs packages and builders the NixOS modules
# under test (nix/module.nix, NixOS impermanence's nixos.nix) use.
#
# Every package is a real `derivation` (so store paths, string context and
# `types.package` behave as with nixpkgs), built by /bin/sh from its
# `buildCommand`; the builders keep their arguments as derivation
# attributes (`text`, `buildCommand`, `nativeBuildInputs`, ...), which is
# what the tests read.  Nothing here is ever built by the tests.
{ lib }:

let
  system = "x86_64-linux";

  mkDerivation = name: env:
    let
      passthru = env.passthru or { };
      attrs = removeAttrs env [ "passthru" ];
    in
    derivation ({
      inherit name system;
      builder = "/bin/sh";
      args = [ "-c" (attrs.buildCommand or "touch $out") ];
    } // attrs) // passthru;

  # A package: bin/<main>, nothing to build.
  package = name: extra: mkDerivation name ({ buildCommand = "mkdir -p $out/bin"; } // extra);

  self = {
    inherit lib system;
    stdenv = { hostPlatform = { inherit system; isLinux = true; }; };

    buildPackages = self;
    pkgsBuildHost = self;

    callPackage = lib.callPackageWith (self // { inherit lib; });

    runCommand = name: env: buildCommand:
      mkDerivation name (env // { inherit buildCommand; });
    runCommandLocal = name: env: buildCommand:
      mkDerivation name (env // { inherit buildCommand; preferLocalBuild = true; allowSubstitutes = false; });
    runCommandCC = self.runCommand;

    writeText = name: text:
      mkDerivation name { inherit text; passAsFile = [ "text" ]; buildCommand = ''cp "$textPath" "$out"''; };
    writeTextFile = { name, text, executable ? false, destination ? "", ... }:
      mkDerivation name { inherit text executable destination; passAsFile = [ "text" ]; buildCommand = ''cp "$textPath" "$out"''; };
    writeScript = name: text: self.writeTextFile { inherit name text; executable = true; };
    writeShellScript = name: text:
      self.writeTextFile { inherit name; executable = true; text = "#!/bin/sh\n" + text; };
    writeShellScriptBin = name: text:
      self.writeTextFile { inherit name; executable = true; destination = "/bin/${name}"; text = "#!/bin/sh\n" + text; };

    # The module reads nothing of the interpreter's version: it is asked of
    # the interpreter itself at build time.
    python3Minimal = package "python3-minimal" { };
    python3 = self.python3Minimal;
    bash = package "bash-5.3" { };
    coreutils = package "coreutils-9.8" { };
    util-linux = package "util-linux-2.41" { };
    patchelf = package "patchelf-0.18.0" { };
    removeReferencesTo = package "remove-references-to" { };
  };
in
self
